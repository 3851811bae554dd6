"""An in-house test plugin (enabled by dotted module path) that slows training down and can
stall inside a checkpoint write, so tests can deliver real signals at known moments.

Settings come from environment variables so a subprocess run can be steered:
FTCORE_TEST_STEP_SLEEP (seconds per step), FTCORE_TEST_STALL_AT_SAVE (the n-th save, 1-based,
that stalls before the checkpoint is renamed), FTCORE_TEST_FLAG_DIR (where flag files go),
FTCORE_TEST_NAN_STEPS (optimizer steps, 1-based, e.g. "2,4-9", whose loss is NaN, as from a
broken loss kernel).
"""

import os
import time
from pathlib import Path

from ftcore.hookspecs import hookimpl

name = "run_control"


def _flag(name: str) -> None:
    flag_dir = os.environ.get("FTCORE_TEST_FLAG_DIR")
    if flag_dir:
        Path(flag_dir, name).write_text("")


@hookimpl
def trainer_callbacks(run):
    from transformers import TrainerCallback

    class SlowSteps(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            run.stash[f"{name}.losses"] = state.global_step * args.gradient_accumulation_steps

        def on_step_end(self, args, state, control, **kwargs):
            _flag(f"step-{state.global_step}")
            time.sleep(float(os.environ.get("FTCORE_TEST_STEP_SLEEP", "0")))

    return [SlowSteps()]


@hookimpl
def checkpoint_state(run):
    saves = run.stash[name] = run.stash.get(name, 0) + 1
    if str(saves) == os.environ.get("FTCORE_TEST_STALL_AT_SAVE"):
        _flag("stalled-in-save")
        time.sleep(600)
    return {"saves": saves}


@hookimpl
def restore_checkpoint_state(state, run):
    run.stash[name] = int(state["saves"])
    _flag(f"restored-{state['saves']}")


def _nan_steps() -> set[int]:
    steps = set()
    for part in filter(None, os.environ.get("FTCORE_TEST_NAN_STEPS", "").split(",")):
        first, _, last = part.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


@hookimpl
def compute_loss(config, model, batch, num_items_in_batch, run):
    losses = run.stash[f"{name}.losses"] = run.stash.get(f"{name}.losses", 0) + 1
    step = (losses - 1) // config.train.gradient_accumulation_steps + 1
    if step in _nan_steps():
        return model(**batch).loss * float("nan")
    return None
