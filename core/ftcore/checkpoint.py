"""Checkpoints per the output_dir contract, as callbacks any HF-Trainer-based method reuses.

The trainer writes ``checkpoints/checkpoint-N`` (the aside copy); ``CheckpointCallback.on_save``
adds ftcore's state (fingerprints, plugin state), renames it to ``checkpoints/step-00000N`` and
writes the ``COMPLETE`` marker last, holding the manifest (every file's size and sha256). Only
complete checkpoints are ever resumed from, and only once they verify against their manifest;
pruning (``save_total_limit``) happens only after a new checkpoint is complete.
``DivergenceCallback`` keeps non-finite weights out of every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
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
SET_ASIDE_PREFIX = "damaged-"
REQUIRED_FILES = ("trainer_state.json", STATE_FILE)
RESUME_STATE_FILES = {
    "optimizer": ("optimizer.pt", "optimizer.bin", "optimizer_0"),
    "scheduler": ("scheduler.pt",),
}
"""Optimizer and scheduler state (any one name of each): without them a resume is not bit-exact."""


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


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was written at."""
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def checkpoint_problems(checkpoint: Path) -> list[str]:
    """What is wrong with a complete checkpoint: required files missing, or files that are missing,
    truncated or changed since its manifest was written (absent optimizer or scheduler state is
    ``missing_resume_state``'s business)."""
    try:
        manifest = json.loads((checkpoint / COMPLETE).read_text() or "{}")  # empty: written before manifests
    except (OSError, ValueError):
        return [f"its {COMPLETE} marker is unreadable"]
    optional = {name for names in RESUME_STATE_FILES.values() for name in names}
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (checkpoint / name).is_file()]
    for name, expected in manifest.get("files", {}).items():
        file = checkpoint / name
        if not file.is_file():
            if Path(name).parts[0] not in optional and f"{name} is missing" not in problems:
                problems.append(f"{name} is missing")
        elif file.stat().st_size != expected["size"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, {expected['size']} when written")
        elif _sha256(file) != expected["sha256"]:
            problems.append(f"{name} changed since it was written (sha256)")
    return problems


def missing_resume_state(checkpoint: Path) -> list[str]:
    """ "optimizer" and/or "scheduler" when ``checkpoint`` lacks that state."""
    return [
        what
        for what, names in RESUME_STATE_FILES.items()
        if not any((checkpoint / n).exists() for n in names)
    ]


def set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the way (``damaged-step-...``, never deleted); return the new path."""
    target, n = checkpoint.with_name(SET_ASIDE_PREFIX + checkpoint.name), 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{SET_ASIDE_PREFIX}{checkpoint.name}-{n}")
    os.replace(checkpoint, target)
    return target


def select_checkpoint(output_dir: str | Path, *, force: bool, log=print) -> Path | None:
    """The newest complete checkpoint that verifies. Damaged newer ones are set aside, saying why; one
    without optimizer or scheduler state is refused (``force``: used with a warning)."""
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        problems = checkpoint_problems(checkpoint)
        if problems:
            aside = set_aside(checkpoint)
            log(
                f"ftcore: checkpoint {checkpoint.name} is damaged ({'; '.join(problems)}); set aside as {aside}"
            )
            continue
        missing = " and ".join(missing_resume_state(checkpoint))
        if missing and not force:
            raise ConfigError(
                f"checkpoint {checkpoint} has no {missing} state: resuming from it would start the {missing} "
                "afresh and not continue the run exactly. Pass --force to resume from it anyway, or move it "
                "out of checkpoints/ to resume from the one before"
            )
        if missing:
            log(
                f"ftcore: warning: checkpoint {checkpoint.name} has no {missing} state; it starts afresh (--force)"
            )
        return checkpoint
    return None


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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _seal(folder: Path) -> dict[str, Any]:
    """Flush every file of ``folder`` to disk; return the manifest: each file's size and sha256."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            os.fsync(handle.fileno())
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "sha256": digest}
    return {"files": files}


def _write_marker(folder: Path, manifest: dict[str, Any]) -> None:
    """The COMPLETE marker, written whole or not at all."""
    tmp = folder / f"{COMPLETE}.tmp"
    with open(tmp, "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / COMPLETE)


class CheckpointCallback(TrainerCallback):
    """Finalises each checkpoint the trainer writes: state, rename, COMPLETE marker, pruning."""

    def __init__(self, run):
        self.run = run
        self._base_fingerprint: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        state.compute_steps(args, state.max_steps)  # this run's save/log/eval intervals, not the checkpoint's

    def on_save(self, args, state, control, **kwargs):
        aside = Path(args.output_dir) / f"{TRAINER_PREFIX}{state.global_step}"
        final = step_dir(self.run.output_dir, state.global_step)
        plugin_state = self.run.plugins.call_each("checkpoint_state", config=self.run.config, run=self.run)
        barrier()
        if _is_main(state) and aside.is_dir():
            import torch

            from ftcore.model import base_model_fingerprint

            self._base_fingerprint = self._base_fingerprint or base_model_fingerprint(self.run.config)
            info = {
                "global_step": state.global_step,
                "epoch": state.epoch,
                "num_input_tokens_seen": state.num_input_tokens_seen,
                "config_fingerprint": self.run.config.fingerprint(RESULT_NEUTRAL_KEYS),
                "data_fingerprint": self.run.data_fingerprint,
                "base_model_fingerprint": self._base_fingerprint,
                "world_size": args.world_size,
                "method": self.run.config.train.method,
            }
            (aside / STATE_FILE).write_text(json.dumps(info, indent=2))
            (aside / "config.toml").write_text(self.run.config.to_toml())
            if plugin_state:
                torch.save(plugin_state, aside / PLUGIN_STATE_FILE)
            manifest = _seal(aside)
            if final.exists():
                shutil.rmtree(final)
            os.replace(aside, final)
            _write_marker(final, manifest)
            self._prune(args)
        barrier()
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
    "train.divergence",
    "train.max_skipped_steps",
)
"""Config keys that may change between a run and its resume without changing the result (the
divergence settings change it only where the run would otherwise have non-finite weights)."""


def check_resumable(
    checkpoint: Path, config, data_fingerprint: str | None, world_size: int, force: bool
) -> None:
    """Refuse a checkpoint whose config, data or base model differ (unless ``force``)."""
    from ftcore.model import base_model_fingerprint

    info = json.loads((checkpoint / STATE_FILE).read_text())
    problems = []
    if info.get("config_fingerprint") != config.fingerprint(RESULT_NEUTRAL_KEYS):
        problems.append("the config changed since this checkpoint was written")
    if data_fingerprint and info.get("data_fingerprint") not in (None, data_fingerprint):
        problems.append("the dataset (or tokenizer, or a setting that changes tokens) changed")
    if info.get("base_model_fingerprint") not in (None, base_model_fingerprint(config)):
        problems.append(f"the base model's files changed ({config.model.base}: config.json or weights)")
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


def nonfinite_flag(tensors, norm=None):
    """A float32 scalar on the tensors' device: 1 where a value of ``tensors`` is not finite on any
    process, else 0 (None for no tensors). ``norm``: their norm, already computed (no pass over
    them). No host read: the all-reduce is queued like any kernel."""
    import torch
    import torch.distributed as dist

    if norm is None:
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP2 shards
        if not local:
            return None
        norm = torch.nn.utils.get_total_norm(local)
    flag = (~norm.isfinite()).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def all_finite(tensors) -> bool:
    """Whether every value of ``tensors`` is finite, on every process (one host read)."""
    flag = nonfinite_flag(tensors)
    return flag is None or not flag.item()


def fused_optimizer(optimizer):
    """The torch optimizer inside ``optimizer`` (the Trainer's accelerate wrapper) where it is a fused
    one that skips its update on the device when its ``found_inf`` is 1 and divides the gradients by
    its ``grad_scale`` (as torch's fused Adam, AdamW and SGD do for the gradient scaler, and
    ``ftcore.optimizer.CompiledAdamW``, which says so by ``fused_step``), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(inner, "param_groups", None)
    if not groups or not getattr(inner, "_step_supports_amp_scaling", False):
        return None
    fused = getattr(inner, "fused_step", False) or all(group.get("fused") for group in groups)
    return inner if fused else None


def _to_host(flag):
    """``flag`` on its way to the host: (host tensor, CUDA event to wait on, or None)."""
    import torch

    if flag.device.type != "cuda":
        return flag, None
    host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class DivergenceCallback(TrainerCallback):
    """Stops a run whose gradients or loss become non-finite (``train.divergence = "stop"``), or skips
    such updates (``"skip_step"``, stopping after ``max_skipped_steps`` in a row); never lets a
    checkpoint or the final model be written with non-finite weights.

    The gradients are checked once per optimizer step, after clipping and before the update. With a
    fused torch optimizer (``adamw_torch_fused``, the default) the check stays on the device: the
    flag is handed to the optimizer as its ``found_inf``, so the fused step skips a non-finite
    update (weights, moments and step count stay as they were) without the host waiting, and the
    flag reaches the host by an asynchronous copy that is read at the next optimizer step (so a
    diverged run is noticed one optimizer step later; that step's update is skipped too), and at
    once before a checkpoint is written, when training stops, and when a loss is logged. With
    other optimizers the host reads one scalar per step and drops a non-finite gradient, so the
    optimizer leaves the weights and its state as they were. Either way, none per micro-batch.
    Under fp16 the gradient scaler already skips such steps, and only the logged loss is checked.
    Must be the last callback: it cancels a save that the ones before it asked for.
    """

    def __init__(self, mode: str = "stop", max_skipped: int = 5):
        self.mode, self.max_skipped = mode, max_skipped
        self.skipped_in_a_row = 0
        self.reason: str | None = None
        """Why the run stopped (None: it did not diverge)."""
        self._pending: list[tuple[int, Any, Any]] = []
        """(step, flag on the host or on its way there, CUDA event recorded after the copy or None)."""
        self._found_inf_on: Any = None
        """The fused optimizer whose ``found_inf`` this callback set for the step under way."""
        self.gradient_norm: Any = None
        """The norm of this step's gradients where the trainer computed it (clipping folded into a
        fused step): the check uses it instead of reading the gradients again. One step only."""

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        norm, self.gradient_norm = self.gradient_norm, None
        if args.fp16:
            return
        fused = fused_optimizer(optimizer)
        if fused is None:
            if not self.reason:
                self._check_on_host(model, state.global_step + 1)
            return
        self._resolve()  # the earlier steps' flags, whose copies are done by now or soon
        import torch

        if self.reason:  # the weights never change after divergence
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            fused.found_inf = torch.ones((), dtype=torch.float32, device=device)
        else:
            flag = nonfinite_flag((p.grad for p in model.parameters() if p.grad is not None), norm)
            if flag is None:
                return
            fused.found_inf = flag
            self._pending.append((state.global_step + 1, *_to_host(flag)))
        self._found_inf_on = fused

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._clear_found_inf()

    def _clear_found_inf(self):
        """The flag is for one step only: never left for a later step or a gradient scaler."""
        if self._found_inf_on is not None:
            if hasattr(self._found_inf_on, "found_inf"):
                del self._found_inf_on.found_inf
            self._found_inf_on = None

    def _check_on_host(self, model, step: int):
        if all_finite(p.grad for p in model.parameters() if p.grad is not None):
            self.skipped_in_a_row = 0
            return
        model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient
        self._non_finite(step)

    def _resolve(self):
        """Acts on the pending flags (earlier steps' ones, or at a save or the end, every one),
        waiting for each one's copy only, never for the whole device."""
        while self._pending:
            step, host, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
            if self.reason:
                continue
            if host.item():
                self._non_finite(step)
            else:
                self.skipped_in_a_row = 0

    def _non_finite(self, step: int):
        if self.mode == "skip_step":
            self.skipped_in_a_row += 1
            print(
                f"ftcore: step {step}: non-finite gradients; update skipped ({self.skipped_in_a_row} in a row)"
            )
            if self.skipped_in_a_row < self.max_skipped:
                return
        self.reason = f"non-finite gradients at step {step}" + (
            f" ({self.skipped_in_a_row} skipped updates in a row)" if self.mode == "skip_step" else ""
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._resolve()  # the logged loss was read by the host: nothing left to wait for
        values = {key: (logs or {}).get(key) for key in ("loss", "grad_norm")}
        bad = [
            f"{key} {value}"
            for key, value in values.items()
            if isinstance(value, float) and not math.isfinite(value)
        ]
        if bad and not self.reason and (self.mode == "stop" or args.fp16):
            self.reason = f"{', '.join(bad)} logged at step {state.global_step}"
        return self._stop(control)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save or control.should_training_stop:
            self._resolve()  # before anything is written, whatever it costs
        if not self.reason and (control.should_save or control.should_training_stop):
            trainable = [p.detach() for p in model.parameters() if p.requires_grad]
            if not all_finite(trainable):
                self.reason = f"non-finite weights after step {state.global_step}"
        return self._stop(control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._resolve()
        return self._stop(control)

    def on_train_end(self, args, state, control, **kwargs):
        self._clear_found_inf()
        self._resolve()
        return self._stop(control)

    def _stop(self, control):
        if self.reason:
            control.should_save = False
            control.should_training_stop = True
        return control
