"""Checkpoints per the output_dir contract, as callbacks any HF-Trainer-based method reuses.

The trainer writes ``checkpoints/checkpoint-N`` (the aside copy); ``CheckpointCallback.on_save``
adds ftcore's state (fingerprints, plugin state), renames it to ``checkpoints/step-00000N`` and
writes the ``COMPLETE`` marker last. Only complete checkpoints are ever resumed from; pruning
(``save_total_limit``) happens only after a new checkpoint is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ftcore.errors import ConfigError

COMPLETE = "COMPLETE"
STATE_FILE = "ftcore_state.json"
PLUGIN_STATE_FILE = "plugin_state.pt"
TRAINER_PREFIX = "checkpoint-"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(output_dir) / f"step-{step:06d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def remove_incomplete(output_dir: str | Path) -> list[Path]:
    """Delete checkpoints that were interrupted mid-write; returns what was removed."""
    root = checkpoints_dir(output_dir)
    removed = []
    for path in root.glob("*") if root.is_dir() else ():
        if path.is_dir() and not (path / COMPLETE).is_file():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _is_main(state) -> bool:
    return state.is_world_process_zero


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


class CheckpointCallback(TrainerCallback):
    """Finalises each checkpoint the trainer writes: state, rename, COMPLETE marker, pruning."""

    def __init__(self, run):
        self.run = run

    def on_save(self, args, state, control, **kwargs):
        aside = Path(args.output_dir) / f"{TRAINER_PREFIX}{state.global_step}"
        final = step_dir(self.run.output_dir, state.global_step)
        plugin_state = self.run.plugins.call_each("checkpoint_state", config=self.run.config, run=self.run)
        _barrier()
        if _is_main(state) and aside.is_dir():
            import torch

            info = {
                "global_step": state.global_step,
                "epoch": state.epoch,
                "num_input_tokens_seen": state.num_input_tokens_seen,
                "config_fingerprint": self.run.config.fingerprint(RESULT_NEUTRAL_KEYS),
                "data_fingerprint": self.run.data_fingerprint,
                "world_size": args.world_size,
                "method": self.run.config.train.method,
            }
            (aside / STATE_FILE).write_text(json.dumps(info, indent=2))
            (aside / "config.toml").write_text(self.run.config.to_toml())
            if plugin_state:
                torch.save(plugin_state, aside / PLUGIN_STATE_FILE)
            _fsync_tree(aside)
            if final.exists():
                shutil.rmtree(final)
            os.replace(aside, final)
            (final / COMPLETE).write_text("")
            self._prune(args)
        _barrier()
        return control

    def _prune(self, args) -> None:
        limit = self.run.config.train.save_total_limit
        if limit:
            for old in complete_checkpoints(self.run.output_dir)[:-limit]:
                (old / COMPLETE).unlink()  # unmark first: a half-deleted folder is never picked
                shutil.rmtree(old)


RESULT_NEUTRAL_KEYS = (
    "train.output_dir",
    "train.save_steps",
    "train.save_total_limit",
    "train.logging_steps",
    "train.eval_steps",
    "train.report_to",
)
"""Config keys that may change between a run and its resume without changing the result."""


def check_resumable(
    checkpoint: Path, config, data_fingerprint: str | None, world_size: int, force: bool
) -> None:
    """Refuse a checkpoint whose config or data differ (unless ``force``)."""
    info = json.loads((checkpoint / STATE_FILE).read_text())
    problems = []
    if info.get("config_fingerprint") != config.fingerprint(RESULT_NEUTRAL_KEYS):
        problems.append("the config changed since this checkpoint was written")
    if data_fingerprint and info.get("data_fingerprint") not in (None, data_fingerprint):
        problems.append("the dataset (or tokenizer, or a setting that changes tokens) changed")
    if info.get("world_size", world_size) != world_size:
        problems.append(f"it was written with {info['world_size']} processes, this run has {world_size}")
    if problems and not force:
        raise ConfigError(
            f"cannot resume from {checkpoint}: {'; '.join(problems)}. Undo the change, or pass --force to resume anyway."
        )


def restore_plugin_state(checkpoint: Path, run) -> None:
    """Hand each enabled plugin the state it saved in ``checkpoint`` (``restore_checkpoint_state``)."""
    path = checkpoint / PLUGIN_STATE_FILE
    if not path.is_file():
        return
    import torch

    states: dict[str, Any] = torch.load(path, weights_only=True)
    for plugin_name, state in states.items():
        if plugin_name in run.plugins.infos:
            run.plugins.call_one(
                "restore_checkpoint_state", plugin_name, config=run.config, state=state, run=run
            )


class StopSignalCallback(TrainerCallback):
    """On SIGTERM/SIGINT: finish the current step, save a resumable checkpoint, stop cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
