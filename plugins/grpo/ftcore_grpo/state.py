"""Where the plugin's hooks find the running grpo trainer.

The core's ``checkpoint_state(config)`` / ``restore_checkpoint_state(config, state)`` hooks get
only the config, so the trainer registers itself here under its output_dir while it exists.
When the core hands hooks a per-run context, this module goes away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_trainers: dict[str, Any] = {}


def _key(config) -> str:
    return str(Path(config.train.output_dir).resolve())


def attach(config, trainer) -> None:
    _trainers[_key(config)] = trainer


def detach(config) -> None:
    _trainers.pop(_key(config), None)


def checkpoint_state(config) -> dict | None:
    trainer = _trainers.get(_key(config))
    return trainer.rollout_state() if trainer is not None else None


def restore(config, state: dict) -> None:
    trainer = _trainers.get(_key(config))
    if trainer is not None:
        trainer.restore_rollout_state(state)
