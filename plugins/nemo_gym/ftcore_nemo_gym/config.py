"""``[nemo_gym]``: where the NeMo Gym servers are and how to talk to them (light: pydantic only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from ftcore.config import LocalPath, Section
from ftcore.errors import ConfigError
from pydantic import AfterValidator, Field, ValidationInfo


def _unresolved_path(value: str, info: ValidationInfo) -> str:
    """Relative to the config file's folder, symlinks kept (a venv's python links to the base interpreter)."""
    base = Path((info.context or {}).get("base_dir", "."))
    return os.path.abspath(base / Path(value).expanduser())


Interpreter = Annotated[str, AfterValidator(_unresolved_path)]


class NemoGymSection(Section):
    """``[nemo_gym]``: a running Gym deployment (``url``) or one ftcore starts (``gym_dir`` +
    ``config_paths`` + ``python``, ``auto_start = true``)."""

    result_neutral = (
        "url", "gym_dir", "python", "auto_start", "head_port", "start_timeout", "verify_timeout", "run_timeout",
        "max_concurrency", "retries", "stop_after_failed_rollouts",
    )  # fmt: skip

    url: str | None = Field(
        None,
        description="The head server of a running Gym deployment, e.g. http://127.0.0.1:11000; the other "
        "servers are found in its global config.",
    )
    gym_dir: LocalPath | None = Field(
        None, description="The Gym root ng_run runs in (auto_start); Gym resolves its relative paths from it."
    )
    config_paths: list[str] = Field(
        default_factory=list,
        description="Gym YAML configs passed to ng_run (auto_start), relative to gym_dir or absolute.",
    )
    python: Interpreter | None = Field(
        None,
        description="The Python of Gym's environment; ng_run is taken from its bin/ folder (auto_start).",
    )
    auto_start: bool = Field(
        False, description="Start ng_run for the run, wait until every server answers, stop it at the end."
    )
    overrides: list[str] = Field(
        default_factory=list,
        description='Extra Hydra overrides for ng_run, e.g. ["+policy_base_url=http://127.0.0.1:8000/v1"].',
    )
    head_port: int = Field(11000, gt=0, lt=65536, description="The head server's port when auto_start.")
    start_timeout: float = Field(600, gt=0, description="Seconds ng_run may take until every server answers.")
    verify_timeout: float = Field(30, gt=0, description="Seconds one /verify or /seed_session call may take.")
    run_timeout: float = Field(300, gt=0, description="Seconds one agent /run (a whole episode) may take.")
    max_concurrency: int = Field(16, ge=1, description="HTTP requests in flight at once.")
    retries: int = Field(
        2, ge=0, description="Retries (1 s apart, doubling) when a server does not answer at all."
    )
    stop_after_failed_rollouts: int = Field(
        3,
        ge=0,
        description="Save a checkpoint and stop when every sample a Gym server handled failed in this many rollouts "
        "in a row (e.g. an agent whose resource server died answers, but every episode errors); 0 = never.",
    )
    multi_turn: bool = Field(
        False,
        description="Play whole episodes through the agent's /run (else: grpo generates, /verify scores).",
    )
    max_turns: int = Field(10, ge=1, description="Model calls per episode at most (multi_turn).")
    policy_name: str = Field(
        "ftcore-policy",
        description="multi_turn with an [adapter]: the name the current LoRA adapter is served under in vLLM; "
        "set Gym's vllm_model model (policy_model_name) to it.",
    )
    agent: str | None = Field(
        None, description="The agent of rows without agent_ref (default: the deployment's only agent)."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.url or self.auto_start)


def check(config) -> None:
    """Cross-table checks of a run with a ``[nemo_gym]`` table; raises ``ConfigError`` naming the key."""
    gym = config.nemo_gym
    if gym.url and gym.auto_start:
        raise ConfigError(
            "give url (a running Gym) or auto_start = true (ftcore starts ng_run), not both",
            file=config.source,
            key="nemo_gym.url",
        )
    if gym.auto_start:
        for key in ("gym_dir", "python"):
            if getattr(gym, key) is None:
                raise ConfigError(
                    f"auto_start needs {key} (the Gym checkout and its environment's Python)",
                    file=config.source,
                    key=f"nemo_gym.{key}",
                )
        if not gym.config_paths:
            raise ConfigError(
                'auto_start needs config_paths, e.g. ["resources_servers/string_match/configs/string_match.yaml"]',
                file=config.source,
                key="nemo_gym.config_paths",
            )
    if not gym.enabled:
        return
    if config.train.method != "grpo":
        raise ConfigError(
            f'[nemo_gym] serves train.method = "grpo", not {config.train.method!r}',
            file=config.source,
            key="train.method",
        )
    if list(config.grpo.rewards) != ["nemo_gym"]:
        raise ConfigError(
            f'the rewards come from Gym: set rewards = ["nemo_gym"] (got {list(config.grpo.rewards)})',
            file=config.source,
            key="grpo.rewards",
        )
    if gym.multi_turn and config.grpo.generation != "vllm":
        raise ConfigError(
            'multi_turn episodes sample from vLLM through Gym\'s model server: set generation = "vllm" '
            "and point Gym's vllm_model at the same server",
            file=config.source,
            key="grpo.generation",
        )
