"""The one path of ``ftcore run``, top to bottom.

config (validated, plugins enabled) -> output_dir guard -> method from the registry -> model and
tokenizer (model hooks, adapters) -> the method builds its trainer (data, callbacks) -> resume
checks -> train -> final save in HF format -> after_train.
"""

from __future__ import annotations

import os
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path

from ftcore.errors import ConfigError, TrainingDiverged, UserError
from ftcore.lock import LOCK_FILE, run_lock


def check_output_dir(config, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs, before anything heavy loads: a non-empty output_dir needs --resume or
    --overwrite."""
    output_dir = Path(config.train.output_dir)
    if output_dir.is_dir() and _contents(output_dir) and not (resume or overwrite):
        raise ConfigError(
            f"output_dir {output_dir} is not empty: pass --resume to continue its run, "
            "or --overwrite to delete it and start again",
            file=config.source,
            key="train.output_dir",
        )


def _contents(output_dir: Path) -> list[Path]:
    """What output_dir holds besides the lock file."""
    return [path for path in output_dir.iterdir() if path.name != LOCK_FILE]


def prepare_output_dir(config, *, resume: bool, overwrite: bool) -> None:
    """The guard above, then ``--overwrite`` empties output_dir (but for the lock file, which this run
    holds); output_dir exists afterwards."""
    check_output_dir(config, resume=resume, overwrite=overwrite)
    output_dir = Path(config.train.output_dir)
    if overwrite and not resume and output_dir.is_dir():
        for path in _contents(output_dir):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def finished_message(output_dir: Path) -> str:
    """Where the run's output is and what to try next, with a path the user can paste."""
    try:
        shown = output_dir.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = output_dir
    shown = shlex.quote(str(shown))
    return (
        f"ftcore: done. The model is in {shown}/ (metrics.jsonl, report.html, checkpoints/).\n"
        f'  Try it:  ftcore generate {shown} --prompt "..."   or   ftcore chat {shown}'
    )


def check_config(config, plugins):
    """The checks of a validated config that need no weights and no data rows (``ftcore validate``
    runs them, and ``ftcore run`` first): the method, and each dataset's format, options, field
    mapping and settings against the method's row schemas. Returns the method class."""
    from ftcore.data.prepare import dataset_specs

    method_cls = plugins.registry("method").get(config.train.method)
    dataset_specs(config, plugins, method_cls.row_schemas)
    return method_cls


def run_training(config, plugins, *, resume: bool = False, overwrite: bool = False, force: bool = False):
    """Train per ``config``; returns a ``RunResult``. The output_dir lock is held throughout."""
    with run_lock(config):
        return _train(config, plugins, resume=resume, overwrite=overwrite, force=force)


def _train(config, plugins, *, resume: bool, overwrite: bool, force: bool):
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from ftcore.checkpoint import (
        DivergenceCallback,
        StopSignalCallback,
        barrier,
        check_resumable,
        checkpoint_step,
        latest_checkpoint,
        remove_incomplete,
        restore_plugin_state,
        select_checkpoint,
    )
    from ftcore.hub import no_usage_calls
    from ftcore.methods import Run, RunResult
    from ftcore.model import load_model_and_tokenizer
    from ftcore.train import attach, run_callbacks

    no_usage_calls()
    hf_logging.set_verbosity_warning()
    output_dir = Path(config.train.output_dir)
    method_cls = check_config(config, plugins)  # before the model loads
    if int(os.environ.get("RANK", "0")) == 0:  # one process guards, overwrites and cleans output_dir
        prepare_output_dir(config, resume=resume, overwrite=overwrite)
        if resume:
            for path in remove_incomplete(output_dir):
                print(f"ftcore: removed incomplete checkpoint {path}")
            select_checkpoint(output_dir, force=force)  # sets damaged checkpoints aside, saying why

    set_seed(config.train.seed)
    checkpoint = latest_checkpoint(output_dir) if resume else None
    run = Run(config=config, plugins=plugins, output_dir=output_dir)
    if checkpoint is not None:
        restore_plugin_state(checkpoint, run)  # first: every later hook finds the state in run.stash
    model, tokenizer = load_model_and_tokenizer(config, plugins, run)
    run.callbacks = run_callbacks(run)
    trainer = attach(method_cls().build_trainer(run), run)
    barrier()  # every process resumes from the checkpoint rank 0 verified: the newest one left
    verified = latest_checkpoint(output_dir) if resume else None
    if verified != checkpoint:  # this rank looked before rank 0 had set a damaged checkpoint aside
        checkpoint = verified
        if checkpoint is not None:
            restore_plugin_state(checkpoint, run)
    if resume and checkpoint is None:
        print(f"ftcore: no complete checkpoint in {output_dir}; starting from the beginning")
    if checkpoint is not None:
        check_resumable(checkpoint, config, run.data_fingerprint, trainer.args.world_size, force)
        print(f"ftcore: resuming from {checkpoint}")
    if trainer.is_world_process_zero():
        (output_dir / "config.resolved.toml").write_text(config.to_toml())

    save_checkpoint = trainer._save_checkpoint  # the Trainer's one checkpoint write, for every method

    def guarded_save_checkpoint(*args, **kwargs):
        with writing("a checkpoint", output_dir):
            return save_checkpoint(*args, **kwargs)

    trainer._save_checkpoint = guarded_save_checkpoint
    if checkpoint is not None and 0 < config.train.max_steps <= checkpoint_step(checkpoint):
        # transformers would train one step past max_steps; a finished run only needs its final model
        print(f"ftcore: {checkpoint.name} is at train.max_steps ({config.train.max_steps}): nothing left to "
              "train; the final model is written from it")  # fmt: skip
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state.global_step = checkpoint_step(checkpoint)
        metrics = {}
    else:
        metrics = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None).metrics
    callbacks = trainer.callback_handler.callbacks
    stop = next(cb for cb in callbacks if isinstance(cb, StopSignalCallback))
    diverged = next(cb for cb in callbacks if isinstance(cb, DivergenceCallback)).reason
    interrupted = stop.received is not None or diverged is not None
    if stop.received is not None and not diverged:
        print(f"ftcore: stopped by signal {stop.received}; continue with: ftcore run CONFIG --resume")
    elif not interrupted:
        with writing("the final model", output_dir):
            trainer.save_model(str(output_dir))
        # training_args.bin is a pickle; config.resolved.toml says what ran
        (output_dir / "training_args.bin").unlink(missing_ok=True)
        if trainer.is_world_process_zero():
            print(finished_message(output_dir))
    result = RunResult(
        output_dir=output_dir,
        global_step=trainer.state.global_step,
        metrics=dict(metrics),
        interrupted=interrupted,
        model=trainer.model,
        stash=run.stash,
    )
    plugins.hook.after_train(config=config, result=result, run=run)
    if diverged:
        raise TrainingDiverged(divergence_message(diverged, output_dir))
    return result


def divergence_message(reason: str, output_dir: Path) -> str:
    from ftcore.checkpoint import latest_checkpoint

    last = latest_checkpoint(output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
    return (
        f"training diverged: {reason}. Nothing non-finite was saved; {kept}. Lower train.learning_rate "
        "(or raise warmup_steps), then start again with --overwrite, or continue from the checkpoint with "
        "--resume --force"
    )


@contextmanager
def writing(what: str, output_dir: Path):
    """Turn a failed write into output_dir (disk full, read-only, permissions) into one line (exit code 2)."""
    try:
        yield
    except Exception as exc:
        try:
            free = f"{shutil.disk_usage(output_dir).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = "its free space unknown"
        raise UserError(
            f"cannot write {what} in {output_dir} ({free}): {type(exc).__name__}: {exc}. Fix that, then "
            "continue with: ftcore run CONFIG --resume"
        ) from exc
