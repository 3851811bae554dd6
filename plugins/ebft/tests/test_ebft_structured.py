"""Structured mode on grpo's extension point, hf backend, stories260K: the reward source and producer
are ebft's, a seeded LoRA run raises alignment, full fine-tuning scores against a frozen copy, resume works."""

import shutil

import pytest
import torch


def structured_config(path, *, adapter=True, **ebft):
    config = {
        "plugins": ["grpo", "ebft"],
        "datasets": [{"path": path, "format": "ebft_opencode"}],
        "train": {"method": "ebft", "micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-2,
                  "scheduler": "constant", "seed": 0, "save_steps": 2},
        "grpo": {"num_generations": 4, "max_completion_length": 24, "temperature": 1.0},
        "ebft": {"embed_method": "last_token", "diversity_coef": 0.0, **ebft},
    }  # fmt: skip
    if adapter:
        config["adapter"] = {"kind": "lora", "r": 8}
    return config


@pytest.mark.slow
def test_a_structured_lora_run_raises_alignment_and_resumes(run_ftcore, stories_file, story_rows):
    config = structured_config(stories_file(story_rows))
    run = run_ftcore(config, steps=12)
    rows = {row["step"]: row for row in run.metrics if "ebft/alignment" in row}
    assert sorted(rows) == list(range(1, 13))
    for row in rows.values():  # the reward grpo trained on is ebft's (no diversity term here)
        assert row["rewards/ebft/mean"] == pytest.approx(2 * row["ebft/alignment"], abs=1e-5)
        assert row["ebft/max_tokens"] <= 24
    first = sum(rows[s]["ebft/alignment"] for s in (1, 2, 3, 4)) / 4
    last = sum(rows[s]["ebft/alignment"] for s in (9, 10, 11, 12)) / 4
    assert last > first + 0.05, (first, last)  # measured 0.28 -> 0.43

    for later in sorted((run.output_dir / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)  # as if the run had stopped after step 2
    resumed = run_ftcore(config, steps=12, resume=True)
    assert resumed.result.global_step == 12
    again = {row["step"]: row for row in resumed.metrics if "ebft/alignment" in row}
    for step in (3, 12):
        assert again[step]["ebft/alignment"] == pytest.approx(rows[step]["ebft/alignment"], abs=1e-4)


def test_the_reward_source_scores_the_reference_itself_highest(stories_file, story_rows):
    """Full fine-tuning: features from a frozen copy; a completion equal to the reference scores cosine 1."""
    from ftcore.config import validate_config
    from ftcore.methods import Run
    from ftcore.testing import stories_model
    from ftcore_ebft.features import FeatureNetwork
    from ftcore_ebft.structured import FeatureReward
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = structured_config(stories_file(story_rows), adapter=False, diversity_coef=0.5)
    raw["model"] = {"base": str(stories_model()), "dtype": "float32"}
    raw["train"]["output_dir"] = "out"
    config, plugins = validate_config(raw)
    model = AutoModelForCausalLM.from_pretrained(stories_model(), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    run = Run(config, plugins, output_dir=None, model=model, tokenizer=tokenizer)
    network = FeatureNetwork(model, config.ebft.feature_layers)
    assert network.model is not model and not any(p.requires_grad for p in network.model.parameters())
    reward = FeatureReward(run, network)
    truth = " The cat liked to play in the park."
    exact = tokenizer(truth, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    other = tokenizer(" Big red car goes fast!", add_special_tokens=False)["input_ids"]
    scores = reward(
        ["", ""], prompts=["Once upon a time, there was a little cat."] * 2, completion_ids=[exact, other],
        ground_truth=[truth] * 2,
    )  # fmt: skip
    terms = reward.take_terms()
    # the exact reference has cosine 1; both samples share the dot product g0 . g1 (the diversity term), so
    # score0 = 2 - 2 x 0.5 x dot and score0 - score1 = 2 (1 - cos1), with alignment = (1 + cos1) / 2
    assert scores[0] == pytest.approx(2 - terms["ebft/diversity"], abs=1e-5)
    assert scores[0] - scores[1] == pytest.approx(4 * (1 - terms["ebft/alignment"]), abs=1e-5)
    assert scores[0] > scores[1]
    assert reward.take_terms() == {}
