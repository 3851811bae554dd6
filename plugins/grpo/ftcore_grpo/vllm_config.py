"""``[grpo.vllm]``: the vLLM generation server (an OpenAI-compatible server in its own environment).

Kept light: pydantic only, no torch and no vLLM. The runtime side is ``ftcore_grpo.vllm``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from ftcore.config import Section
from pydantic import Field, ValidationInfo, field_validator, model_validator

PYTHON_ENV = "FTCORE_VLLM_PYTHON"
"""Environment variable naming the vLLM environment's interpreter when ``python`` is not set."""


class VLLMSection(Section):
    """``[grpo.vllm]``: where completions come from when ``[grpo] generation = "vllm"``.

    Either ``url`` (a server you started, e.g. with ``ftcore vllm-serve CONFIG``) or ``python`` (the
    interpreter of the environment vLLM is installed in; ftcore then starts the server for the run
    and stops it at the end).
    """

    result_neutral = ("url", "python", "host", "port", "startup_timeout", "request_timeout", "retries")

    url: str | None = Field(
        None,
        description="Base URL of a running vLLM OpenAI server, e.g. http://127.0.0.1:8000 (started with "
        "ftcore vllm-serve CONFIG). Not with python.",
    )
    python: str | None = Field(
        None,
        description=f"The Python of the vLLM environment (e.g. ~/venvs/vllm/bin/python): ftcore starts the "
        f"server itself. A bare name is looked up on PATH; default: ${PYTHON_ENV}. Not with url.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Interface a server ftcore starts binds to (0.0.0.0 exposes it to the network).",
    )
    port: int = Field(0, ge=0, lt=65536, description="Port of a server ftcore starts; 0 = a free port.")
    startup_timeout: float = Field(
        900, gt=0, description="Seconds to wait for a started server to answer /health (model load, warm-up)."
    )
    request_timeout: float = Field(
        600, gt=0, description="Seconds one HTTP request may take (a whole generation batch is one request)."
    )
    retries: int = Field(
        3, ge=0, description="Retries of a failed or timed-out request before the run stops with an error."
    )
    backoff: float = Field(
        2.0, ge=0, description="Seconds before the first retry; doubled for each further retry."
    )
    max_model_len: int | None = Field(
        None,
        gt=0,
        description="Context length of a server ftcore starts (default: train.sequence_len, which must hold "
        "prompt + max_completion_length); a running server's must be at least that.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype of a server ftcore starts (auto: model.dtype when set, else vLLM's choice).",
    )
    max_lora_rank: int | None = Field(
        None, gt=0, description="--max-lora-rank of a server ftcore starts (default: adapter.r)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Fraction of GPU memory vLLM may use (vLLM's default when unset)."
    )
    cpu_kv_cache_gb: float = Field(
        1.0, gt=0, description="KV-cache size in GiB on vLLM's CPU backend (VLLM_CPU_KVCACHE_SPACE)."
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description='More arguments for the vLLM server, e.g. ["--enforce-eager", "--tensor-parallel-size", "2"].',
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for a server ftcore starts."
    )
    check_model: bool = Field(
        True,
        description="Refuse a server whose model is not model.base (compared by path or hub id); turn off only "
        "for a copy of the same weights served under another name.",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {value!r})")
        if value.endswith("/v1"):
            value = value[: -len("/v1")]
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or ("/" not in value and not value.startswith("~")):
            return value  # unset, or a command name found on PATH
        base = Path((info.context or {}).get("base_dir", "."))
        # absolute, but symlinks kept: a venv's bin/python is a link to the base interpreter
        return os.path.abspath(base / Path(value).expanduser())

    @model_validator(mode="after")
    def _one_source(self) -> VLLMSection:
        if self.url is not None and self.python is not None:
            raise ValueError("set url (use a running server) or python (start one), not both")
        return self
