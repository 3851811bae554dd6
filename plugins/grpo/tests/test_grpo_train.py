"""grpo runs end to end on the real stories260K: metrics, completions.jsonl, checkpoints, and a
resume after SIGKILL that continues with the same prompts (and, on the CPU, the same samples)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from ftcore.checkpoint import COMPLETE, step_dir
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training
from ftcore.testing import stories_model

ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "fox"]
REWARDS = """
def says_the(completions, **kwargs):
    return [float(" the " in text) for text in completions]
"""


def write_config(tmp_path, *, steps, extra=""):
    (tmp_path / "grpo_run_rewards.py").write_text(REWARDS)
    rows = [{"prompt": f"Once upon a time, there was a {a} who", "animal": a} for a in ANIMALS * 2]
    rows += [{"prompt": f"The {a} was very", "animal": a} for a in ANIMALS]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "config.toml"
    path.write_text(f"""
plugins = ["grpo"]
[model]
base = "{stories_model()}"
dtype = "float32"
[[datasets]]
path = "prompts.jsonl"
format = "prompt"
options = {{columns = ["animal"]}}
[train]
method = "grpo"
output_dir = "out"
micro_batch_size = 4
gradient_accumulation_steps = 2
sequence_len = 64
max_steps = {steps}
save_steps = 2
logging_steps = 1
learning_rate = 5e-4
seed = 3
[grpo]
num_generations = 4
max_completion_length = 10
rewards = ["grpo_run_rewards:says_the", "length_penalty"]
reward_weights = [1.0, 0.5]
log_completions_steps = 1
log_completions_count = 8
{extra}
""")
    return path


def completions_by_step(output_dir):
    steps = {}
    for line in (output_dir / "completions.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps.setdefault(row["step"], []).append(row)
    return steps


@pytest.mark.slow
def test_a_run_logs_rollout_metrics_completions_and_checkpoint_state(tmp_path):
    config, plugins = load_config(write_config(tmp_path, steps=2, extra="beta = 0.05\nreward_workers = 1"))
    result = run_training(config, plugins)
    rows = [row for row in read_metrics(result.output_dir) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    names = ["grpo_run_rewards:says_the", "length_penalty"]
    expected = {"reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean",
                "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/truncated_fraction", "policy/version_lag_mean", "policy/version_lag_max",
                "timing/generation_seconds", "timing/scoring_seconds"}  # fmt: skip
    expected |= {f"rewards/{name}/{stat}" for name in names for stat in ("mean", "std", "failures")}
    assert expected <= set(rows[0]), expected - set(rows[0])
    assert rows[0]["policy/version_lag_max"] == 0 and rows[0]["rewards/length_penalty/failures"] == 0
    samples = completions_by_step(result.output_dir)
    assert sorted(samples) == [1, 2] and all(len(rows) == 8 for rows in samples.values())
    first = samples[1][0]
    assert set(first) == {"step", "rollout", "policy_version", "prompt", "completion", "finish_reason", "tokens",
                          "rewards", "reward", "advantage"}  # fmt: skip
    assert first["rollout"] == 0 and samples[2][0]["rollout"] == 1 and samples[2][0]["policy_version"] == 1
    assert [row["prompt"] for row in samples[1]][:4] == [first["prompt"]] * 4  # one group of 4
    state = torch.load(step_dir(result.output_dir, 2) / "plugin_state.pt", weights_only=True)["grpo"]
    assert state["rollout_index"] == 2 and state["sampler_seed"] == 3 and state["prompts_seen"] == 4
    assert "reward" in (result.output_dir / "report.html").read_text()


def ftcore(*args, cwd):
    command = [sys.executable, "-m", "ftcore.cli", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_continues_with_the_same_prompts(tmp_path):
    path = write_config(tmp_path, steps=6)
    killed = ftcore("run", str(path), cwd=tmp_path)
    config, plugins = load_config(path, ["train.output_dir=reference"])
    run_training(config, plugins)  # the uninterrupted run, meanwhile
    marker = tmp_path / "out" / "checkpoints" / "step-000002" / COMPLETE
    deadline = time.monotonic() + 300
    while not marker.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, killed.stdout.read()[-3000:]  # still training when killed
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "out" / "model.safetensors").exists()
    resumed = ftcore("run", str(path), "--resume", cwd=tmp_path)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from" in output
    expected, got = completions_by_step(tmp_path / "reference"), completions_by_step(tmp_path / "out")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert [row["prompt"] for row in got[step]] == [row["prompt"] for row in expected[step]], step
        assert [row["rollout"] for row in got[step]] == [step - 1] * 8
    # the same weights and the same rollout seeds: the same completions after the resume, on the CPU
    assert [row["completion"] for row in got[6]] == [row["completion"] for row in expected[6]]


PRODUCER_PLUGIN = """
from ftcore.hookspecs import hookimpl
from ftcore_grpo.rollout import RolloutProducer

name = "token_count_env"
produced = []


class TokenCountEnv(RolloutProducer):
    \"\"\"Generates as grpo does; scores every completion by its length in tokens.\"\"\"

    def produce(self, rows, index):
        rollout = super().produce(rows, index)
        produced.append(index)
        rollout.rewards = [[float(len(c.token_ids))] for c in rollout.completions]
        return rollout


@hookimpl(optionalhook=True)
def grpo_rollout_producer(run, generator, scorer, sampling):
    return TokenCountEnv(generator, scorer, sampling, seed=run.config.train.seed)
"""


def test_a_plugin_supplies_the_rollouts_through_grpo_rollout_producer(tmp_path, monkeypatch):
    (tmp_path / "grpo_envs").mkdir()
    (tmp_path / "grpo_envs" / "__init__.py").write_text("")
    (tmp_path / "grpo_envs" / "token_count.py").write_text(PRODUCER_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, steps=2)
    text = path.read_text().replace('plugins = ["grpo"]', 'plugins = ["grpo", "grpo_envs.token_count"]')
    text = text.replace(
        'rewards = ["grpo_run_rewards:says_the", "length_penalty"]', 'rewards = ["length_penalty"]'
    )
    path.write_text(text.replace("reward_weights = [1.0, 0.5]", ""))
    config, plugins = load_config(path)
    run_training(config, plugins)
    from grpo_envs import token_count

    assert token_count.produced == [0, 1]
    rows = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert rows and all(row["reward"] == row["tokens"] for row in rows)


@pytest.mark.parametrize("resume_at", [2, 3])  # at an epoch's end, and inside the second epoch
def test_resume_in_a_later_epoch_continues_with_the_same_prompts(tmp_path, resume_at):
    import shutil

    path = write_config(tmp_path, steps=6, extra="")
    rows = [{"prompt": f"Once upon a time, there was a {a} who", "animal": a} for a in ANIMALS[:4]]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows)
    )  # 2 steps an epoch
    config, plugins = load_config(path, ["train.save_steps=1"])
    run_training(config, plugins)
    output_dir = tmp_path / "out"
    expected = completions_by_step(output_dir)
    for item in output_dir.iterdir():  # back to the checkpoint of step `resume_at`, as after a crash
        if item.name.startswith("model") or item.suffix == ".safetensors":
            item.unlink()
    for checkpoint in (output_dir / "checkpoints").iterdir():
        if checkpoint.name > step_dir(output_dir, resume_at).name:
            shutil.rmtree(checkpoint)
    config, plugins = load_config(path, ["train.save_steps=1"])
    run_training(config, plugins, resume=True)
    got = completions_by_step(output_dir)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert {row["prompt"] for row in expected[1] + expected[2]} == {
        row["prompt"] for row in expected[3] + expected[4]
    }
    for step in expected:
        assert [row["prompt"] for row in got[step]] == [row["prompt"] for row in expected[step]], step


def test_the_epoch_sampler_orders_prompts_as_trls_and_by_epoch_after_a_restart():
    from ftcore_grpo.trainer import EpochRepeatSampler
    from trl.trainer.utils import RepeatSampler

    options = dict(data_source=range(10), mini_repeat_count=2, batch_size=3, repeat_count=2, seed=5)
    trl, ours = RepeatSampler(**options), EpochRepeatSampler(**options)
    epochs = [list(trl) for _ in range(3)]
    assert [list(ours) for _ in range(3)] == epochs and epochs[0] != epochs[1]
    restarted = EpochRepeatSampler(**options)
    restarted.set_epoch(2)
    assert list(restarted) == epochs[2]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_trains_under_bf16_mixed_precision(tmp_path, dtype):
    """Mixed precision (autocast) with float32 or bf16 weights: the packed forward's LM head runs
    outside autocast on the hidden states it captured."""
    path = write_config(tmp_path, steps=2)
    config, plugins = load_config(path, ['train.precision="bf16"', f'model.dtype="{dtype}"'])
    run_training(config, plugins)
    rows = [row for row in read_metrics(tmp_path / "out") if "loss" in row]
    assert len(rows) == 2 and all(row["loss"] == row["loss"] for row in rows)
