"""DPO runs on the real pretrained stories260K: real hh-rlhf pairs and a chat preference set (CPU)."""

import shutil
import subprocess
import sys
import tomllib

import pytest
import torch
from ftcore.checkpoint import step_dir
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.model import load_model_and_tokenizer, load_tokenizer
from ftcore_dpo.pairs import prepare_pairs
from safetensors.torch import load_file


def rows_with(output_dir, key):
    return [row for row in read_metrics(output_dir) if key in row]


def mean(values):
    return sum(values) / len(values)


def preference_margin(model, pairs) -> float:
    """Mean log p(chosen) - log p(rejected) of ``model`` over tokenized pairs."""
    margins = []
    with torch.no_grad():
        for pair in pairs:
            logps = []
            for side in ("chosen_ids", "rejected_ids"):
                ids = torch.tensor([pair["prompt_ids"] + pair[side]])
                logits = model(ids).logits[0, :-1].log_softmax(-1)
                token_logps = logits.gather(-1, ids[0, 1:, None])[:, 0]
                logps.append(token_logps[len(pair["prompt_ids"]) - 1 :].sum().item())
            margins.append(logps[0] - logps[1])
    return mean(margins)


@pytest.mark.slow
def test_lora_dpo_run_learns_the_preferences_and_its_adapter_reloads(make_config, hh_dataset, chat_dataset):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    path = make_config(
        hh_dataset() + chat_dataset,
        train="max_steps = 20\neval_steps = 10",
        extra="[dpo]\nbeta = 0.1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ftcore.cli", "run", str(path), "--set", "data.val_fraction=0.1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = path.parent / "out"
    steps = rows_with(out, "rewards/accuracies")
    assert len(steps) == 20
    assert mean([r["rewards/accuracies"] for r in steps[-5:]]) > 0.5
    assert (
        mean([r["rewards/margins"] for r in steps[-5:]])
        > mean([r["rewards/margins"] for r in steps[:5]]) + 1.0
    )
    assert len(rows_with(out, "eval_rewards/accuracies")) == 2
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    assert (out / "report.html").is_file() and (out / "config.resolved.toml").is_file()

    config, plugins = load_config(path, ["data.val_fraction=0.1"])
    pairs = prepare_pairs(config, plugins, load_tokenizer(config)).train.select(
        range(24)
    )  # the cached tokens
    reloaded = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(config.model.base).eval()
    assert preference_margin(reloaded, pairs) > preference_margin(base, pairs) + 1.0


@pytest.mark.slow
def test_weighted_sigmoid_plus_ipo_and_resume(make_config, chat_dataset, tmp_path, run_ftcore):
    path = make_config(
        chat_dataset,
        train="save_steps = 3",
        extra='[dpo]\nbeta = 0.5\nloss_type = ["sigmoid", "ipo"]\nloss_weights = [1.0, 0.5]',
    )
    config = tomllib.loads(path.read_text())
    reference = run_ftcore(config, steps=6)
    losses = {row["step"]: row["loss"] for row in reference.metrics if "loss" in row}
    # At step 1 the policy is the reference: sigmoid gives ln 2, ipo (0 - 1/(2 beta))^2 = 1, weighted 0.5.
    assert losses[1] == pytest.approx(0.6931 + 0.5, abs=1e-3)
    assert losses[6] < losses[1]

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(step_dir(reference.output_dir, 3), step_dir(resumed_dir, 3))  # as if stopped after step 3
    shutil.copy(reference.output_dir / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    config["train"]["output_dir"] = str(resumed_dir)
    resumed = run_ftcore(config, steps=6, resume=True)
    assert {row["step"]: row["loss"] for row in resumed.metrics if "loss" in row} == losses
    expected, got = (
        load_file(reference.output_dir / "adapter_model.safetensors"),
        load_file(resumed_dir / "adapter_model.safetensors"),
    )
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.result.global_step == 6


def build_trainer(path, overrides=()):
    from ftcore.methods import Run
    from ftcore.train import run_callbacks
    from ftcore_dpo.method import DPOMethod

    config, plugins = load_config(path, list(overrides))
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    run = Run(
        config=config, plugins=plugins, model=model, tokenizer=tokenizer, output_dir=path.parent / "out"
    )
    run.callbacks = run_callbacks(run)
    return DPOMethod().build_trainer(run), run


def test_lora_reference_is_the_adapter_disabled_base(make_config, chat_dataset):
    trainer, run = build_trainer(make_config(chat_dataset))
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    assert run.data_fingerprint
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    with trainer.model.disable_adapter(), torch.no_grad():
        logps = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.log_softmax(-1)
    token_logps = (
        logps[:, :-1].gather(-1, batch["input_ids"][:, 1:, None])[..., 0] * batch["completion_mask"][:, 1:]
    )
    assert torch.allclose(torch.cat([chosen, rejected]), token_logps.sum(-1), atol=1e-4)


def test_full_finetune_reference_is_a_frozen_copy_or_precomputed(make_config, chat_dataset):
    trainer, run = build_trainer(make_config(chat_dataset, adapter=False), ["train.max_steps=2"])
    ref = trainer.ref_model
    assert ref is not None and ref is not run.model and not any(p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    trainer.train()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # the reference stays frozen
    assert not torch.equal(before["model.norm.weight"], run.model.state_dict()["model.norm.weight"])

    trainer, _ = build_trainer(
        make_config(chat_dataset, adapter=False, name="pre.toml"), ["dpo.precompute_ref_log_probs=true"]
    )
    assert trainer.ref_model is None
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
