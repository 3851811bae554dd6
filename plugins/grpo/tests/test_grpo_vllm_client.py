"""The vllm backend's pieces that need no vLLM: the [grpo.vllm] table, timeouts and retries against
real sockets (a closed port, a server that never answers), and the errors people see."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ftcore.config import load_config
from ftcore.errors import ConfigError
from ftcore_grpo.vllm import (
    WORKER_DIR,
    WORKER_EXTENSION,
    VLLMClient,
    VLLMServerError,
    free_port,
    same_model,
    server_command,
    vllm_version,
)


def write(tmp_path: Path, vllm: str, adapter: bool = True) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(f"""plugins = ["grpo"]
[model]
base = "{tmp_path}"
{"[adapter]" if adapter else ""}
[train]
method = "grpo"
output_dir = "out"
micro_batch_size = 4
[grpo]
generation = "vllm"
rewards = ["length_penalty"]
num_generations = 4
[grpo.vllm]
{vllm}
""")
    return path


def test_the_vllm_table_takes_a_url_or_a_python(tmp_path):
    config, _ = load_config(write(tmp_path, 'url = "http://127.0.0.1:8000/v1/"'))
    assert config.grpo.vllm.url == "http://127.0.0.1:8000"
    assert config.grpo.vllm.host == "127.0.0.1" and config.grpo.vllm.request_timeout > 0
    with pytest.raises(ConfigError, match="not both"):
        load_config(write(tmp_path, 'url = "http://127.0.0.1:8000"\npython = "python3"'))
    with pytest.raises(ConfigError, match="http://"):
        load_config(write(tmp_path, 'url = "127.0.0.1:8000"'))

    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    config, _ = load_config(write(tmp_path, 'python = "venv/bin/python"'))
    assert config.grpo.vllm.python == str(venv / "python")  # relative to the config; the link is kept
    config, _ = load_config(write(tmp_path, 'python = "python3"'))
    assert config.grpo.vllm.python == "python3"  # a name is looked up on PATH


def test_a_closed_port_fails_after_the_retries_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    client = VLLMClient(url, timeout=5, retries=2, backoff=0.1)
    started = time.monotonic()
    with pytest.raises(VLLMServerError) as info:
        client.models()
    message = str(info.value)
    assert message.startswith(f"vLLM server {url}: GET /v1/models failed 3 times")
    assert "ConnectionRefusedError" in message and "Is the server still running" in message
    assert 0.3 <= time.monotonic() - started < 5  # 0.1 + 0.2 s of backoff


def test_a_server_that_never_answers_times_out():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():  # accepts connections and never answers: a hung server
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        started = time.monotonic()
        with pytest.raises(VLLMServerError, match=r"failed 2 times .*no answer within 0.5s"):
            VLLMClient(url, timeout=0.5, retries=1, backoff=0).post("/v1/completions", {"prompt": [[1]]})
        assert time.monotonic() - started < 5 and len(accepted) == 2
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_an_owned_server_that_died_is_reported_at_once():
    client = VLLMClient(f"http://127.0.0.1:{free_port()}", retries=5, backoff=10,
                        alive=lambda: "the server process exited with code 1")  # fmt: skip
    started = time.monotonic()
    with pytest.raises(VLLMServerError, match="exited with code 1"):
        client.models()
    assert time.monotonic() - started < 1


def test_a_python_without_vllm_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vLLM is not installed for"):
        vllm_version(sys.executable)
    with pytest.raises(ConfigError, match="does not exist"):
        vllm_version(str(tmp_path / "nope" / "python"))


def test_server_command():
    command = server_command("py", "/m", port=8123, max_model_len=64, dtype="float32", lora_rank=12)
    assert command[:5] == ["py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    joined = " ".join(command)
    assert "--host 127.0.0.1 --port 8123" in joined and "--logprobs-mode processed_logprobs" in joined
    assert "--max-model-len 64" in joined and "--dtype float32" in joined and "--max-lora-rank 16" in joined
    assert (
        f"--worker-extension-cls {WORKER_EXTENSION}" in joined and "--no-enable-chunked-prefill" not in joined
    )
    plain = " ".join(server_command("py", "/m", port=1, cpu=True))
    assert "--enable-lora" not in plain and "--no-enable-chunked-prefill" in plain


def test_the_worker_extension_is_importable_alone():
    """vLLM's workers import it by name from WORKER_DIR, in an environment without ftcore."""
    code = "import ftcore_vllm_worker as m; print(m.FtcoreWorkerExtension().ftcore_extension_version())"
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(WORKER_DIR)!r}); {code}"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.stdout.strip() == "1", result.stderr


def test_a_served_model_is_the_same_path_or_hub_id(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "model")
    assert same_model(str(tmp_path / "link"), str(tmp_path / "model"))
    assert same_model("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B") and not same_model(
        "Qwen/Qwen3-0.6B", str(tmp_path)
    )


def test_vllm_serve_needs_to_know_which_python(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FTCORE_VLLM_PYTHON"}
    result = subprocess.run([sys.executable, "-m", "ftcore.cli", "vllm-serve", str(write(tmp_path, ""))],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "which Python has vLLM? Pass --python" in result.stderr
