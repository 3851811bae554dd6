"""Async prefetch against the REAL vLLM server of conftest.py (the session's ``tiny_server``)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from ftcore.checkpoint import step_dir
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training

pytestmark = pytest.mark.slow


def test_a_lora_run_prefetching_two_batches_finishes_syncs_and_resumes(
    tiny_server, tiny_vllm_model, vllm_config, tmp_path, caplog
):
    prompts = tmp_path / "prompts.jsonl"
    words = ["cats", "dogs", "birds", "fish", "frogs", "ducks", "bears", "foxes"]
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."}) + "\n" for w in words))
    text = vllm_config(
        tiny_vllm_model, adapter=True, prompts=prompts,
        train="max_steps = 4\nsave_steps = 2\nlogging_steps = 1",
        grpo="async_prefetch = true\nprefetch_depth = 2\nlog_completions_steps = 1\nlog_completions_count = 4",
        vllm=f'url = "{tiny_server.url}"',
    )  # fmt: skip
    path = tmp_path / "async.toml"
    path.write_text(text)
    config, plugins = load_config(path)
    with caplog.at_level(logging.WARNING, logger="ftcore.grpo"):
        result = run_training(config, plugins)
    output_dir = result.output_dir
    rows = [row for row in read_metrics(output_dir) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    lags = [row["policy/version_lag_max"] for row in rows]
    assert lags[0] == 0 and all(0 <= lag <= 2 for lag in lags) and max(lags) >= 1  # up to 2 batches ahead
    trained = [row for row in rows if "entropy" in row]  # a step whose micro-batches all skipped has none
    assert trained and all("sampling/importance_sampling_ratio/mean" in row for row in trained)  # vLLM's
    versions = [json.loads(line)["policy_version"] for line in (output_dir / "completions.jsonl").open()]
    assert max(versions) >= 1  # the adapter was synced along the way

    # resume from step 2: the same prompts for rollouts 2 and 3, and the run ends at step 4 again
    first = [json.loads(line) for line in (output_dir / "completions.jsonl").open()]
    shutil.rmtree(step_dir(output_dir, 4))
    resumed = run_training(config, plugins, resume=True)
    again = [json.loads(line) for line in (output_dir / "completions.jsonl").open()]
    assert [(r["step"], r["rollout"], r["prompt"]) for r in again] == [
        (r["step"], r["rollout"], r["prompt"]) for r in first
    ]
    state = torch.load(step_dir(resumed.output_dir, 4) / "plugin_state.pt", weights_only=True)["grpo"]
    assert state["rollout_index"] == 4
    assert not [r for r in caplog.records if "differ from the planned" in r.getMessage()]
