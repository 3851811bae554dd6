"""Fixtures of the nemo_gym tests: a real NeMo Gym environment and real Gym servers, no mocks.

- ``gym_python``: the Python of a Gym 0.7.0 environment. ``FTCORE_GYM_PYTHON`` names an existing
  one; otherwise it is built once under ``~/.cache/ftcore/test-envs/nemo-gym-0.7.0``
  (``FTCORE_TEST_ENVS`` moves the root): the wheel's dependencies installed normally, then the
  wheel with ``--no-deps --ignore-requires-python`` (Gym declares Python >= 3.13; its servers run
  on 3.11). About 2 to 4 minutes on a 2-core machine, once; a marker file says it is complete, a
  lock keeps two test runs from building it at once.
- ``gym``: one deployment for the session, started by the plugin's own ``auto_start`` launcher
  (``ng_run``): the ``string_match``, ``example_session_state_mgmt`` and ``example_single_tool_call``
  resource servers with their ``simple_agent``s and Gym's ``vllm_model``. Every server gets the
  test environment's Python (``uv_venv_dir`` holds links to it, ``skip_venv_if_present``), so ng_run
  installs nothing.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from ftcore.testing import VenvBuildError, cached_venv

GYM_VERSION = "0.7.0"
ENV_NAME = f"nemo-gym-{GYM_VERSION}"
BUILD_TIMEOUT = 30 * 60
SERVER_DIRS = (
    "resources_servers/string_match",
    "resources_servers/example_session_state_mgmt",
    "resources_servers/example_single_tool_call",
    "responses_api_agents/simple_agent",
    "responses_api_models/vllm_model",
    "environment_servers/legacy_agent",
)
CONFIGS = (
    "resources_servers/string_match/configs/string_match.yaml",
    "resources_servers/example_session_state_mgmt/configs/example_session_state_mgmt.yaml",
    "resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml",
    "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml",
)
REPO = Path(__file__).resolve().parents[3]
DATA = REPO / "core" / "ftcore" / "testdata" / "data" / "nemo_gym"


def install_gym(pip, env_dir: Path) -> None:
    """The nemo-gym wheel declares Python >= 3.13 but runs on 3.11: its dependencies installed as
    usual, then the wheel itself without the Python check."""
    wheels = env_dir / "wheel"
    pip("download", f"nemo-gym=={GYM_VERSION}", "--no-deps", "--ignore-requires-python", "-d", str(wheels))
    wheel = next(wheels.glob("nemo_gym-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"nemo_gym-{GYM_VERSION}.dist-info/METADATA").decode()
    requirements = [
        line.split(":", 1)[1].strip()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    pip("install", *requirements)
    pip("install", "--no-deps", "--ignore-requires-python", str(wheel))


def build_gym_env() -> Path:
    """The Gym environment's python, built once."""
    try:
        return cached_venv(
            ENV_NAME,
            install_gym,
            timeout=BUILD_TIMEOUT,
            hint=f"It installs nemo-gym=={GYM_VERSION} and its dependencies from the package index, so it needs "
            "access to it; or point FTCORE_GYM_PYTHON at an existing Gym environment's python.",
        )
    except VenvBuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def gym_python() -> Path:
    existing = os.environ.get("FTCORE_GYM_PYTHON")
    return Path(existing) if existing else build_gym_env()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gym_root(python: Path) -> Path:
    """Where the Gym wheel put its server folders (site-packages): ng_run's working directory."""
    out = subprocess.run(
        [str(python), "-c", "import nemo_gym, pathlib; print(pathlib.Path(nemo_gym.__file__).parents[1])"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return Path(out.stdout.strip())


def linked_venvs(folder: Path, python: Path) -> Path:
    """A ``uv_venv_dir`` whose per-server venvs are links to the test environment."""
    for server in SERVER_DIRS:
        (folder / server).mkdir(parents=True, exist_ok=True)
        (folder / server / ".venv").symlink_to(python.parent.parent)
    return folder


class GymDeployment:
    """The session's Gym: head URL, launcher (the plugin's), servers by name."""

    def __init__(self, launcher, url: str):
        from ftcore_nemo_gym.client import discover

        self.launcher, self.url = launcher, url
        self.servers = discover(url)


def start_gym(
    tmp: Path,
    python: Path,
    configs=CONFIGS,
    policy_url="http://127.0.0.1:9/v1",
    model="ftcore-policy",
    head_port=None,
    extra=(),
) -> GymDeployment:
    from ftcore_nemo_gym.config import NemoGymSection
    from ftcore_nemo_gym.launcher import GymLauncher

    venvs = linked_venvs(tmp / "venvs", python)
    section = NemoGymSection(
        auto_start=True, gym_dir=str(gym_root(python)), python=str(python), config_paths=list(configs),
        head_port=head_port or free_port(), start_timeout=300,
        overrides=[f"+uv_venv_dir={venvs}", f"+policy_base_url={policy_url}", "+policy_api_key=none",
                   f"+policy_model_name={model}", "+model_endpoint_readiness_timeout_seconds=0", *extra],
    )  # fmt: skip
    launcher = GymLauncher(section, tmp / "ng_run.log")
    return GymDeployment(launcher, launcher.start())


@pytest.fixture(scope="session")
def gym(tmp_path_factory, gym_python):
    deployment = start_gym(tmp_path_factory.mktemp("gym"), gym_python)
    yield deployment
    deployment.launcher.stop()


@pytest.fixture
def start_deployment(gym_python):
    """Start another deployment for one test (``start(folder, configs)``); stopped after the test."""
    started = []

    def start(folder: Path, configs=CONFIGS, **kwargs) -> GymDeployment:
        started.append(start_gym(folder, gym_python, configs, **kwargs))
        return started[-1]

    yield start
    for deployment in started:
        deployment.launcher.stop()


@pytest.fixture
def gym_setup(gym_python):
    """``setup(folder) -> (gym_dir, uv_venv_dir, head_port)`` for a config with ``auto_start``."""

    def setup(folder: Path):
        return gym_root(gym_python), linked_venvs(folder / "venvs", gym_python), free_port()

    return setup


@pytest.fixture(scope="session")
def gym_data() -> Path:
    return DATA


# ----------------------------------------------------------------------------------------------
# multi-turn: a real vLLM server (grpo's CPU test environment) that Gym's vllm_model proxies to

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] %}{% for t in m['tool_calls'] %}<tool_call>{{ t['function'] | tojson }}</tool_call>"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_chat_llama(path: Path) -> Path:
    """A random-init tiny Llama (head_dim 64, as vLLM's CPU attention needs) with the stories tokenizer and a
    chat template that renders tool calls."""
    import torch
    from ftcore.testing import stories_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def vllm_python() -> str:
    """grpo's vLLM test environment (built by its fixture code, once, under the same lock)."""
    if os.environ.get("FTCORE_VLLM_PYTHON"):
        return os.environ["FTCORE_VLLM_PYTHON"]
    spec = importlib.util.spec_from_file_location(
        "grpo_test_envs", REPO / "plugins" / "grpo" / "tests" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.build_vllm_env())


def serve_config(model: Path) -> str:
    return f"""plugins = ["grpo"]
[model]
base = "{model}"
dtype = "float32"
[adapter]
r = 8
alpha = 16
[train]
method = "grpo"
output_dir = "out"
sequence_len = 256
micro_batch_size = 4
[grpo]
generation = "vllm"
rewards = ["length_penalty"]
num_generations = 4
max_completion_length = 16
[grpo.vllm]
max_model_len = 512
extra_args = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]  # the rows carry tools
"""


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory):
    """``ftcore vllm-serve`` for the chat model: (model folder, URL); stopped after the module."""
    folder = tmp_path_factory.mktemp("policy")
    model = save_chat_llama(folder / "model")
    (folder / "serve.toml").write_text(serve_config(model))
    port = free_port()
    command = [sys.executable, "-m", "ftcore.cli", "vllm-serve", str(folder / "serve.toml"), "--python",
               vllm_python(), "--port", str(port), "--log", str(folder / "vllm.log")]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5).close()
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                log = (folder / "vllm.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"vLLM did not start:\n{log}")
            time.sleep(2)
    yield model, url
    os.killpg(process.pid, signal.SIGTERM)  # vllm-serve stops its server's group
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
