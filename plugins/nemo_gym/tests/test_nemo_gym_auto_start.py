"""auto_start: the run starts ng_run, waits for every server, and stops it at the end and on errors."""

from __future__ import annotations

import json
import urllib.request

import pytest
from ftcore.config import load_config
from ftcore.pipeline import run_training
from ftcore.testing import stories_model
from ftcore_nemo_gym.client import ServerDown

pytestmark = pytest.mark.slow


def write_config(tmp_path, gym_python, gym_dir, configs, port, venvs) -> str:
    rows = [{"responses_create_params": {"input": "Once upon a time"}, "expected_answer": "there",
             "extraction_mode": "full_response"}]  # fmt: skip
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = tmp_path / "config.toml"
    overrides = [f"+uv_venv_dir={venvs}", "+policy_base_url=http://127.0.0.1:9/v1", "+policy_api_key=none",
                 "+policy_model_name=m", "+model_endpoint_readiness_timeout_seconds=0"]  # fmt: skip
    path.write_text(f"""plugins = ["grpo", "nemo_gym"]
[model]
base = "{stories_model()}"
[[datasets]]
path = "tasks.jsonl"
format = "nemo_gym"
options = {{agent = "string_match_simple_agent"}}
[train]
method = "grpo"
output_dir = "out"
micro_batch_size = 4
sequence_len = 32
max_steps = 1
[grpo]
num_generations = 4
max_completion_length = 2
rewards = ["nemo_gym"]
[nemo_gym]
auto_start = true
python = "{gym_python}"
gym_dir = "{gym_dir}"
config_paths = {json.dumps(list(configs))}
head_port = {port}
overrides = {json.dumps(overrides)}
start_timeout = 300
""")
    return path


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/global_config_dict_yaml", timeout=5).close()
        return True
    except OSError:
        return False


def test_a_run_starts_gym_and_stops_it_at_the_end(tmp_path, gym_python, gym_setup):
    gym_dir, venvs, port = gym_setup(tmp_path)
    configs = ["resources_servers/string_match/configs/string_match.yaml",
               "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"]  # fmt: skip
    config, plugins = load_config(write_config(tmp_path, gym_python, gym_dir, configs, port, venvs))
    result = run_training(config, plugins)
    assert result.global_step == 1
    assert "Starting `string_match`" in (tmp_path / "out" / "nemo-gym.log").read_text()
    assert not answers(f"http://127.0.0.1:{port}")  # stopped with the run


def test_a_gym_that_cannot_start_is_an_error_with_its_log(tmp_path, gym_python, gym_setup):
    gym_dir, venvs, port = gym_setup(tmp_path)
    config, plugins = load_config(
        write_config(tmp_path, gym_python, gym_dir, ["no/such/config.yaml"], port, venvs)
    )
    with pytest.raises(
        ServerDown, match=r"ng_run \(exited with \d+, head http://127.0.0.1:\d+\).*nemo-gym.log"
    ):
        run_training(config, plugins)
    assert not answers(f"http://127.0.0.1:{port}")
