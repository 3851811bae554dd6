"""Multi-turn structured rollouts on the hf backend, stories260K: each later assistant turn is generated
after the conversation so far and the row's next user turn, which is context (mask 0)."""

import shutil

import pytest
import torch

CHAT = [
    {"messages": [
        {"role": "user", "content": f"Tell me about the {a}."},
        {"role": "assistant", "content": f"The {a} was happy."},
        {"role": "user", "content": "What next?"},
        {"role": "assistant", "content": f"The {a} played in the park."},
    ]}
    for a in ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "fox"]
]  # fmt: skip


def multi_turn_config(path):
    return {
        "plugins": ["grpo", "ebft"],
        "model": {"chat_template": "chatml"},
        "datasets": [{"path": path, "format": "ebft_chat", "options": {"target": "first", "multi_turn": True}}],
        "adapter": {"kind": "lora", "r": 8},
        "train": {"method": "ebft", "micro_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                  "scheduler": "constant", "seed": 0, "save_steps": 2, "sequence_len": 128},
        "grpo": {"num_generations": 2, "max_completion_length": 16, "temperature": 1.0,
                 "stop": [".", ",", "!"]},
        "ebft": {"diversity_coef": 0.0, "adaptive_max_tokens": False},
    }  # fmt: skip


@pytest.fixture
def producer(stories_file):
    """An ebft producer on the real stories260K model (full fine-tuning) with the hf backend."""
    from ftcore.chat_templates import CHATML
    from ftcore.config import validate_config
    from ftcore.methods import Run
    from ftcore.testing import stories_model
    from ftcore_ebft.features import FeatureNetwork
    from ftcore_ebft.structured import EBFTProducer, FeatureReward
    from ftcore_grpo.generation import HFGenerator
    from ftcore_grpo.method import sampling_params
    from ftcore_grpo.scoring import Reward, RewardScorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = multi_turn_config(stories_file(CHAT))
    del raw["adapter"]
    raw["model"] |= {"base": str(stories_model()), "dtype": "float32"}
    raw["train"]["output_dir"] = "out"
    config, plugins = validate_config(raw)
    model = AutoModelForCausalLM.from_pretrained(stories_model(), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    tokenizer.chat_template = CHATML
    run = Run(config, plugins, output_dir=None, model=model, tokenizer=tokenizer)
    reward = FeatureReward(run, FeatureNetwork(model, config.ebft.feature_layers))
    generator = HFGenerator(model, tokenizer)
    made = EBFTProducer(generator, RewardScorer([Reward("ebft", reward)]), sampling_params(config), seed=0, rank=0,
                        run=run, reward=reward)  # fmt: skip
    return made, run


def rows_of(tokenizer, n=2):
    from ftcore_ebft.formats import Chat
    from ftcore_grpo.data import tokenize_prompt

    row = Chat({"target": "first", "multi_turn": True}).convert(CHAT[0])
    row["prompt_ids"] = tokenize_prompt(tokenizer, row["prompt"], {})
    return [dict(row) for _ in range(n)]


def runs(mask):
    """(value, length) of each run of equal mask values."""
    out = []
    for bit in mask:
        if out and out[-1][0] == bit:
            out[-1][1] += 1
        else:
            out.append([bit, 1])
    return [tuple(r) for r in out]


def test_a_multi_turn_rollout_generates_turn_by_turn_with_the_user_turn_as_context(producer):
    from dataclasses import replace

    from ftcore_ebft.reward import conversation_rewards
    from ftcore_ebft.structured import turn_spans
    from ftcore_grpo.rollout import rollout_seed

    producer, run = producer
    tokenizer = run.tokenizer
    rows = rows_of(tokenizer)
    rollout = producer.produce(rows, index=6)  # a seed whose first turns both stop
    user_turn = "<|im_start|>user\nWhat next?<|im_end|>\n<|im_start|>assistant\n"
    # replay the two generate calls: the first turn (n = 2 of the prompt), then each second turn after it
    sampling = replace(producer.sampling, seed=rollout_seed(0, 6))
    firsts = producer.generator.generate([rows[0]["prompt_ids"]], 2, sampling)[0]
    assert all(c.finish_reason == "stop" for c in firsts)  # both end in a stop string: a second turn
    # the context: what the chat template adds after the first turn for the user turn and the next turn's prompt
    contexts = [
        c.token_ids[len(f.token_ids) :][: c.mask.count(0)]
        for c, f in zip(rollout.completions, firsts, strict=True)
    ]
    seconds = producer.generator.generate(
        [rows[0]["prompt_ids"] + f.token_ids + ctx for f, ctx in zip(firsts, contexts, strict=True)],
        1, replace(sampling, seed=sampling.seed + 1),
    )  # fmt: skip
    for completion, first, context, (second,) in zip(
        rollout.completions, firsts, contexts, seconds, strict=True
    ):
        assert tokenizer.decode(context) == user_turn
        assert completion.token_ids == first.token_ids + context + second.token_ids
        assert runs(completion.mask) == [
            (1, len(first.token_ids)),
            (0, len(context)),
            (1, len(second.token_ids)),
        ]
        assert completion.logprobs == first.logprobs + [0.0] * len(context) + second.logprobs
        assert completion.finish_reason == second.finish_reason

    # the reference conversation: prompt, reference turn, the same user turn, reference turn; features are
    # pooled per turn and averaged over each conversation's turns
    reward, row = producer.reward, rows[0]
    reference, spans = reward.reference(
        row["prompt"], row["prompt_ids"], row["ground_truth"], row["remaining_turns"]
    )
    prompt = len(row["prompt_ids"])
    assert (
        tokenizer.decode(reference[prompt:])
        == f"The cat was happy.</s>{user_turn} The cat played in the park.</s>"
    )
    assert [tokenizer.decode(reference[a:b]) for a, b in spans] == [
        "The cat was happy.</s>",
        "The cat played in the park.</s>",
    ]
    samples = [(row["prompt_ids"] + c.token_ids, turn_spans(c.mask, prompt)) for c in rollout.completions]
    features = reward.network.features(
        [seq for seq, _ in samples] + [reference], [sp for _, sp in samples] + [spans], "last_token", 0
    )
    assert [f.shape[0] for f in features] == [2, 2, 2]
    expected = conversation_rewards(features[:2], features[2], 1.0, 0.0)
    assert [r[0] for r in rollout.rewards] == pytest.approx(expected.rewards.tolist(), abs=1e-5)


def test_a_seeded_multi_turn_run_trains_and_resumes(run_ftcore, stories_file):
    config = multi_turn_config(stories_file(CHAT))
    run = run_ftcore(config, steps=4)
    rows = {row["step"]: row for row in run.metrics if "ebft/alignment" in row}
    assert sorted(rows) == [1, 2, 3, 4]
    for row in rows.values():  # the reward grpo trained on is ebft's multi-turn one (no diversity term)
        assert row["rewards/ebft/mean"] == pytest.approx(2 * row["ebft/alignment"], abs=1e-5)
        assert row["grad_norm"] > 0
    assert max(row["completions/max_length"] for row in rows.values()) > 16  # past one turn's max_tokens

    for later in sorted((run.output_dir / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)  # as if the run had stopped after step 2
    resumed = run_ftcore(config, steps=4, resume=True)
    assert resumed.result.global_step == 4
    again = {row["step"]: row for row in resumed.metrics if "ebft/alignment" in row}
    for step in (3, 4):
        assert again[step]["ebft/alignment"] == pytest.approx(rows[step]["ebft/alignment"], abs=1e-4)


@pytest.mark.parametrize("split", [True, False])
def test_special_tokens_spelled_in_later_turns_follow_split_special_tokens(split):
    """A user turn and a reference turn that spell out ``</s>``: plain text under
    ``data.split_special_tokens`` (the default), the EOS token otherwise, as in the prompt."""
    from ftcore.chat_templates import CHATML
    from ftcore.testing import stories_model
    from ftcore_ebft.structured import FeatureReward, context_ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    tokenizer.chat_template = CHATML
    eos = tokenizer.eos_token_id
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    context = context_ids(tokenizer, history, [{"role": "user", "content": "Say </s> now."}], {}, split)
    assert tokenizer.decode(context).startswith("<|im_start|>user\nSay </s> now.<|im_end|>")
    assert (eos in context) is not split

    reward = FeatureReward.__new__(FeatureReward)  # only the tokenizer and the setting are used here
    reward.tokenizer, reward.split_special_tokens = tokenizer, split
    reference = reward.reference_ids("The </s> end.")
    assert reference[-1] == eos  # the turn's own end is always the EOS token
    assert (eos in reference[:-1]) is not split
