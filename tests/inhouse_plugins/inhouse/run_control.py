"""An in-house test plugin (enabled by dotted module path) that slows training down and can
stall inside a checkpoint write, so tests can deliver real signals at known moments.

Settings come from environment variables so a subprocess run can be steered:
FTCORE_TEST_STEP_SLEEP (seconds per step), FTCORE_TEST_STALL_AT_SAVE (the n-th save, 1-based,
that stalls before the checkpoint is renamed), FTCORE_TEST_FLAG_DIR (where flag files go).
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
def trainer_callbacks(config):
    from transformers import TrainerCallback

    class SlowSteps(TrainerCallback):
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
