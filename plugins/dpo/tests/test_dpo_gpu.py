"""DPO on a CUDA GPU in bf16 (run on a GPU machine before a change to the dpo plugin is called done)."""

import pytest
import torch
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training

pytestmark = pytest.mark.gpu


def steps(output_dir):
    return [row for row in read_metrics(output_dir) if "rewards/margins" in row]


def test_lora_dpo_bf16_learns_the_preferences(make_config, hh_dataset, chat_dataset):
    path = make_config(hh_dataset() + chat_dataset, train="max_steps = 20")
    config, plugins = load_config(path, ["model.dtype=bfloat16"])
    result = run_training(config, plugins)
    assert next(result.model.parameters()).device.type == "cuda"
    rows = steps(result.output_dir)
    assert sum(r["rewards/accuracies"] for r in rows[-5:]) / 5 > 0.5
    assert sum(r["rewards/margins"] for r in rows[-5:]) > sum(r["rewards/margins"] for r in rows[:5]) + 5.0
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_full_finetune_with_precomputed_reference_bf16(make_config, chat_dataset):
    path = make_config(
        chat_dataset, adapter=False, train="max_steps = 8", extra="[dpo]\nprecompute_ref_log_probs = true"
    )
    config, plugins = load_config(path, ["model.dtype=bfloat16", "train.learning_rate=2e-4"])
    result = run_training(config, plugins)
    rows = steps(result.output_dir)
    assert rows[0]["rewards/margins"] == pytest.approx(
        0.0, abs=0.05
    )  # bf16 policy vs its own precomputed logps
    assert sum(r["rewards/margins"] for r in rows[-3:]) / 3 > 0.5
    assert torch.cuda.max_memory_allocated() > 0
