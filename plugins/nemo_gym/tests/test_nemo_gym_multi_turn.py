"""Multi-turn: episodes through Gym's simple_agent, the policy served by a real vLLM server through
Gym's vllm_model; the trained sequence rebuilt from the transcript's token ids."""

from __future__ import annotations

import json

import pytest
from ftcore.config import load_config
from ftcore.pipeline import run_training
from ftcore_nemo_gym.client import GymError
from ftcore_nemo_gym.producer import fit_episode, transcript_tokens

AGENT = "example_single_tool_call_simple_agent"
CONFIGS = (
    "resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml",
    "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
)
CAPTURE_PLUGIN = """
from ftcore.hookspecs import hookimpl

name = "capture_rollout"
rollouts = []


@hookimpl
def after_train(config, result, run):
    rollouts.append(run.trainer.last_rollout)
"""


def test_a_transcript_becomes_ids_whose_mask_covers_the_policys_turns():
    output = [
        {"type": "function_call", "prompt_token_ids": [1, 2, 3], "generation_token_ids": [4, 5],
         "generation_log_probs": [-0.1, -0.2]},
        {"type": "function_call_output", "output": "sunny"},
        {"type": "message", "prompt_token_ids": [1, 2, 3, 4, 5, 6, 7], "generation_token_ids": [8],
         "generation_log_probs": [-0.3]},
    ]  # fmt: skip
    assert transcript_tokens(output, 10) == (
        [1, 2, 3],
        [4, 5, 6, 7, 8],
        [1, 1, 0, 0, 1],
        [-0.1, -0.2, 0.0, 0.0, -0.3],
    )
    assert transcript_tokens(output, 1) == ([1, 2, 3], [4, 5], [1, 1], [-0.1, -0.2])  # max_turns
    output[2]["prompt_token_ids"] = [1, 2, 9, 4, 5, 6]
    with pytest.raises(GymError, match="does not extend"):
        transcript_tokens(output, 10)


def test_an_episode_longer_than_sequence_len_is_cut_and_counts_as_truncated():
    prompt, ids, mask, logprobs = [1, 2, 3], [4, 5, 6, 7, 8], [1, 1, 0, 0, 1], [-0.1, -0.2, 0.0, 0.0, -0.3]
    assert fit_episode(prompt, ids, mask, logprobs, 8) == (ids, mask, logprobs, "stop")
    assert fit_episode(prompt, ids, mask, logprobs, 6) == ([4, 5, 6], [1, 1, 0], [-0.1, -0.2, 0.0], "length")


@pytest.mark.slow
def test_episodes_through_simple_agent_train_one_step(
    tmp_path, monkeypatch, policy_server, start_deployment, gym_data
):
    model, vllm_url = policy_server
    gym = start_deployment(tmp_path / "gym", CONFIGS, policy_url=f"{vllm_url}/v1", model="ftcore-policy")
    (tmp_path / "nemo_gym_capture").mkdir()
    (tmp_path / "nemo_gym_capture" / "__init__.py").write_text("")
    (tmp_path / "nemo_gym_capture" / "rollouts.py").write_text(CAPTURE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "config.toml").write_text(f"""plugins = ["grpo", "nemo_gym", "nemo_gym_capture.rollouts"]
[model]
base = "{model}"
dtype = "float32"
[adapter]
r = 8
alpha = 16
[[datasets]]
path = "{gym_data / "example_single_tool_call_example.jsonl"}"
format = "nemo_gym"
options = {{agent = "{AGENT}"}}
[train]
method = "grpo"
output_dir = "out"
sequence_len = 256
micro_batch_size = 4
max_steps = 1
logging_steps = 1
learning_rate = 1e-3
seed = 0
[grpo]
generation = "vllm"
num_generations = 4
max_completion_length = 16
rewards = ["nemo_gym"]
[grpo.vllm]
url = "{vllm_url}"
[nemo_gym]
url = "{gym.url}"
multi_turn = true
max_turns = 3
""")
    config, plugins = load_config(tmp_path / "config.toml")
    result = run_training(config, plugins)
    assert result.global_step == 1
    from nemo_gym_capture import rollouts

    rollout = rollouts.rollouts[-1]
    assert rollout.rewards and all(r[0] is not None for r in rollout.rewards)  # the agent's rewards
    for row, completion in zip(rollout.rows, rollout.completions, strict=True):
        # one model call per episode here (the tiny model calls no tool): every generated token is trained
        assert 0 < len(completion.token_ids) <= 16 and completion.mask == [1] * len(completion.token_ids)
        assert len(completion.logprobs) == len(completion.token_ids) and all(
            lp <= 0 for lp in completion.logprobs
        )
        assert row["prompt_ids"] and json.loads(row["nemo_gym_task"])["responses_create_params"]["tools"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    step = next(row for row in rows if "loss" in row)
    assert step["nemo_gym/run_errors"] == 0 and step[f"nemo_gym/{AGENT}/turns"] == 1
