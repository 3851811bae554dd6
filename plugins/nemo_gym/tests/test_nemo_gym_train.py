"""grpo trains on a real Gym deployment: single-turn rewards from string_match's /verify, and a
resource server killed mid-run (None rewards counted, a checkpoint, a clear error, a resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ftcore.checkpoint import COMPLETE, latest_checkpoint
from ftcore.config import load_config
from ftcore.metrics import read_metrics
from ftcore.pipeline import run_training
from ftcore.testing import stories_model

pytestmark = pytest.mark.slow

AGENT = "string_match_simple_agent"
TASKS = [  # stories260K's first word after each prompt; the expected one is likely but not the likeliest
    ("Once upon a time, there was a little", "b"),
    ("One day, a little girl named", "Lily"),
    ("Tom and Sue went to the", "st"),
    ("The dog wanted to play with the", "b"),
]


def write_config(tmp_path: Path, url: str, *, steps: int, extra: str = "") -> Path:
    rows = [
        {"responses_create_params": {"input": prompt}, "expected_answer": answer, "extraction_mode": "full_response",
         "agent_ref": {"type": "responses_api_agents", "name": AGENT}}
        for prompt, answer in TASKS
    ]  # fmt: skip
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "config.toml"
    path.write_text(f"""
plugins = ["grpo", "nemo_gym"]
[model]
base = "{stories_model()}"
dtype = "float32"
[[datasets]]
path = "tasks.jsonl"
format = "nemo_gym"
[train]
method = "grpo"
output_dir = "out"
micro_batch_size = 4
gradient_accumulation_steps = 4
sequence_len = 32
max_steps = {steps}
save_steps = 2
logging_steps = 1
learning_rate = 2e-3
seed = 1
[grpo]
num_generations = 4
max_completion_length = 1
rewards = ["nemo_gym"]
log_completions_steps = 1
[nemo_gym]
url = "{url}"
{extra}
""")
    return path


def completions(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "completions.jsonl").read_text().splitlines()]


def test_single_turn_grpo_scores_with_verify_and_raises_the_reward(tmp_path, gym):
    config, plugins = load_config(write_config(tmp_path, gym.url, steps=6))
    result = run_training(config, plugins)
    rows = [row for row in read_metrics(result.output_dir) if "loss" in row]
    assert len(rows) == 6
    assert all(row["nemo_gym/verify_errors"] == 0 for row in rows)
    env = f"nemo_gym/{AGENT}"
    assert {
        f"{env}/reward_mean",
        f"{env}/success_rate",
        f"{env}/turns",
        f"{env}/tool_calls",
        f"{env}/errors",
    } <= set(rows[0])
    expected = {prompt: answer for prompt, answer in TASKS}
    for sample in completions(result.output_dir):  # string_match's verdict: the word, case-insensitive
        assert sample["rewards"]["nemo_gym"] == float(
            sample["completion"].strip().lower() == expected[sample["prompt"]].lower()
        )
    rewards = [row[f"{env}/reward_mean"] for row in rows]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.15, rewards


def process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(child) for child in children.read_text().split()] if children.exists() else []
    return [pid] + [p for child in found for p in process_tree(child)]


def kill_server(head_url: str, name: str) -> None:
    with urllib.request.urlopen(head_url + "/server_instances", timeout=10) as reply:
        instances = json.loads(reply.read())
    pid = next(instance["pid"] for instance in instances if instance["process_name"] == name)
    for process in process_tree(pid):
        os.kill(process, signal.SIGKILL)


def test_a_server_killed_mid_run_stops_the_run_after_a_checkpoint_and_it_resumes(tmp_path, start_deployment):
    string_match_only = (
        "resources_servers/string_match/configs/string_match.yaml",
        "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
    )
    doomed = start_deployment(tmp_path / "gym", string_match_only)
    path = write_config(tmp_path, doomed.url, steps=14, extra="retries = 1")
    command = [sys.executable, "-m", "ftcore.cli", "run", str(path)]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    marker = tmp_path / "out" / "checkpoints" / "step-000002" / COMPLETE
    deadline = time.monotonic() + 300
    while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() is None, run.stdout.read()[-3000:]
    kill_server(doomed.url, "string_match")
    output = run.communicate(timeout=300)[0]
    assert run.returncode != 0, output[-3000:]
    assert "Gym server string_match (http://127.0.0.1:" in output and "does not answer" in output, output[
        -3000:
    ]
    assert "ftcore run CONFIG --resume" in output
    rows = [row for row in read_metrics(tmp_path / "out") if "loss" in row]
    assert (
        rows[-1]["nemo_gym/verify_errors"] == 16 and rows[-1]["step"] < 14
    )  # every sample of the last rollout
    # before: no error, or some (the rollout the kill cut into) without stopping the run
    errors = [row["nemo_gym/verify_errors"] for row in rows]
    assert errors[0] == 0 and all(e < 16 for e in errors[:-1]), errors
    checkpoint = latest_checkpoint(tmp_path / "out")
    assert checkpoint.name == f"step-{rows[-1]['step']:06d}"  # saved after the failed step
    # Gym is back (restarted on the same head port): --resume continues from that checkpoint to the end
    doomed.launcher.stop()
    start_deployment(tmp_path / "gym-again", string_match_only, head_port=doomed.launcher.section.head_port)
    stopped = rows[-1]["step"]
    config, plugins = load_config(path)
    result = run_training(config, plugins, resume=True)
    assert result.global_step == 14
    resumed = [row for row in read_metrics(tmp_path / "out") if "loss" in row and row["step"] > stopped]
    assert [row["step"] for row in resumed] == list(range(stopped + 1, 15))
    assert all(row["nemo_gym/verify_errors"] == 0 for row in resumed)
