"""The [nemo_gym] table's checks, the nemo_gym dataset format, and a light plugin import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ftcore.config import load_config
from ftcore.errors import ConfigError
from ftcore.testing import stories_model
from ftcore_nemo_gym.data import NemoGymTasks

DATA = Path(__file__).resolve().parents[3] / "core" / "ftcore" / "testdata" / "data" / "nemo_gym"


def write(tmp_path, grpo="", gym='url = "http://127.0.0.1:11000"'):
    path = tmp_path / "config.toml"
    path.write_text(f"""plugins = ["grpo", "nemo_gym"]
[model]
base = "{stories_model()}"
[[datasets]]
path = "tasks.jsonl"
format = "nemo_gym"
[train]
method = "grpo"
output_dir = "out"
micro_batch_size = 4
sequence_len = 64
[grpo]
num_generations = 4
max_completion_length = 8
{grpo}
[nemo_gym]
{gym}
""")
    (tmp_path / "tasks.jsonl").write_text('{"responses_create_params": {"input": "hi"}}\n')
    return path


@pytest.mark.parametrize(
    ("grpo", "gym", "key", "fix"),
    [
        ('rewards = ["gsm8k_accuracy"]', 'url = "http://x:1"', "grpo.rewards", 'rewards = ["nemo_gym"]'),
        ('rewards = ["nemo_gym"]', 'url = "http://x:1"\nauto_start = true', "nemo_gym.url", "not both"),
        ('rewards = ["nemo_gym"]', 'auto_start = true\npython = "gym/bin/python"', "nemo_gym.gym_dir", "gym_dir"),
        ('rewards = ["nemo_gym"]', 'auto_start = true\npython = "p"\ngym_dir = "g"', "nemo_gym.config_paths", "string_match.yaml"),
        ('rewards = ["nemo_gym"]', 'url = "http://x:1"\nmulti_turn = true', "grpo.generation", 'generation = "vllm"'),
    ],
)  # fmt: skip
def test_config_errors_name_the_file_the_key_and_the_fix(tmp_path, grpo, gym, key, fix):
    path = write(tmp_path, grpo, gym)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert error.value.file == str(path) and error.value.key == key and fix in str(error.value)


def test_relative_paths_resolve_from_the_config_file(tmp_path):
    gym = 'auto_start = true\npython = "gym/.venv/bin/python"\ngym_dir = "gym"\nconfig_paths = ["a.yaml"]'
    config, _ = load_config(write(tmp_path, 'rewards = ["nemo_gym"]', gym))
    assert config.nemo_gym.python == str(tmp_path / "gym" / ".venv" / "bin" / "python")
    assert config.nemo_gym.gym_dir == str(tmp_path / "gym")


def test_gym_tasks_become_prompt_rows_that_keep_the_task():
    tasks = NemoGymTasks({"agent": "weather_agent"})
    lines = (DATA / "example_single_tool_call_example.jsonl").read_text().splitlines()
    raw = json.loads(lines[0])
    row = tasks.convert({key: raw.get(key) for key in (*tasks.fields, *tasks.optional_fields)})
    assert row["prompt"][0]["role"] == "system" and row["prompt"][1] == {
        "role": "user",
        "content": "what's it like in sf?",
    }
    assert json.loads(row["nemo_gym_task"])["responses_create_params"]["tools"][0]["name"] == "get_weather"
    assert row["nemo_gym_agent"] == "weather_agent"
    raw = json.loads((DATA / "string_match_example.jsonl").read_text().splitlines()[0])
    row = tasks.convert(
        {**raw, "agent_ref": {"type": "responses_api_agents", "name": "string_match_simple_agent"}}
    )
    assert row["prompt"] == [
        {"role": "user", "content": "What is the capital of France? Put your final answer in \\boxed{}."}
    ]
    assert (
        json.loads(row["nemo_gym_task"])["expected_answer"] == "Paris"
        and row["nemo_gym_agent"] == "string_match_simple_agent"
    )
    assert NemoGymTasks().convert({"responses_create_params": {"input": "Once"}})["prompt"] == "Once"
    with pytest.raises(ValueError, match="ends with an assistant message"):
        NemoGymTasks().convert(
            {"responses_create_params": {"input": [{"role": "assistant", "content": "x"}]}}
        )


def test_the_plugin_imports_without_torch():
    code = "import sys, ftcore_nemo_gym.plugin; assert 'torch' not in sys.modules and 'ftcore_grpo.trainer' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
