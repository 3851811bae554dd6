"""An in-house plugin whose callback logs a metric with ``Run.log_metrics`` at every step, a
tracker-like callback that records every row it is handed, and a metric logged too late, after
training (for the tests of the metrics route)."""

from ftcore.hookspecs import hookimpl

name = "metrics_probe"


@hookimpl
def trainer_callbacks(run):
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            run.log_metrics({"probe/step_squared": state.global_step**2})

    class Recorder(TrainerCallback):
        """Records each logged row and whether the metrics route ran before every other callback."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            first = type(run.trainer.callback_handler.callbacks[0]).__name__
            run.stash.setdefault(name, []).append({**logs, "first_callback": first})

    return [Probe(), Recorder()]


@hookimpl
def after_train(run):
    try:
        run.log_metrics({"probe/too_late": 1})
    except RuntimeError as exc:  # the trackers are closed: an error, not a silent loss
        run.stash["too_late"] = str(exc)
