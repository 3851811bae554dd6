"""The training-method contract: what ``register_methods`` registers.

A method is a class with:

- ``row_schemas``: the canonical row schemas it accepts (``messages``, ``prompt_completion``,
  ``text``, ``tokens``, ``preference``, ``prompt_only``); the core checks every dataset's
  format against it before loading anything.
- ``build_trainer(run)``: return a ``transformers.Trainer`` (or subclass, e.g. a TRL trainer)
  built from the ``Run``. The core then trains it, resumes it, saves checkpoints through its
  callbacks and writes the final model.
- ``preview(config, plugins, tokenizer, n, *, color)`` (optional): for a method that tokenizes
  its own rows (DPO), prepare them (filling the cache) and return the lines ``ftcore preprocess``
  prints: the first ``n`` rows with the trained tokens marked (``ftcore.data.preview.render_row``),
  then a summary. Without it the command shows the core's rows.

Online-RL methods (GRPO, EBFT, NeMo Gym) fit the same shape; see docs/methods.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from ftcore.config import Config
    from ftcore.plugins import Plugins


class Method(Protocol):
    row_schemas: ClassVar[tuple[str, ...]]

    def build_trainer(self, run: Run) -> Any: ...


@dataclass
class Run:
    """The context of one run: built by the core, handed to the run-time hooks as ``run`` and to
    ``Method.build_trainer``.

    The core fills ``model`` and ``tokenizer`` while loading (``tokenizer`` before the model hooks,
    ``model`` once built, then again once adapters wrap it), ``callbacks`` before the method builds
    its trainer and ``trainer`` once it has. Each run (each ``ftcore run`` or ``run_training`` call)
    gets a new context, so state kept here never leaks into another run.
    """

    config: Config
    plugins: Plugins
    output_dir: Path
    model: Any = None
    tokenizer: Any = None
    callbacks: list[Any] = field(default_factory=list)
    """The core's callbacks (metrics, progress, report, checkpoints, signals) and the plugins'."""
    data_fingerprint: str | None = None
    """Set by the method once its data is prepared; stored in checkpoints and checked on resume."""
    stash: dict[str, Any] = field(default_factory=dict)
    """Plugin state for this run, one key per plugin (by convention its name): ``run.stash["faq"]``.
    ``checkpoint_state`` returns what should survive ``--resume``."""
    trainer: Any = None
    """The trainer the method built (None until then)."""
    _metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    _training_done: bool = field(default=False, repr=False)

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Add ``{name: number}`` to the next row the trainer logs.

        The row (every ``train.logging_steps`` steps, and the summary at the end of training) goes
        to metrics.jsonl, the trackers of ``train.report_to`` and report.html. A name logged twice
        before that row keeps its last value; 0-d tensors are read when the row is written. Call it
        during training (hooks, callbacks before ``on_log``, ``compute_loss``); only the values of
        the main process are written.
        """
        if self._training_done:
            raise RuntimeError(
                "Run.log_metrics: training has ended and its trackers are closed; log during training "
                "(e.g. in a callback's on_step_end), or write a file of your own to run.output_dir"
            )
        for name, value in metrics.items():
            if not isinstance(name, str):
                raise TypeError(f"Run.log_metrics: metric names are strings, got {name!r}")
            self._metrics[name] = value

    def pop_metrics(self) -> dict[str, Any]:
        """The metrics logged since the last call, as plain numbers (the core calls this when it logs)."""
        pending, self._metrics = self._metrics, {}
        return {name: value.item() if hasattr(value, "item") else value for name, value in pending.items()}


@dataclass
class RunResult:
    """What ``run_training`` returns and ``after_train`` receives."""

    output_dir: Path
    global_step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    model: Any = None
    """The trained model in memory (for notebooks and tests)."""
    stash: dict[str, Any] = field(default_factory=dict)
    """The run's ``Run.stash`` at the end of training (plugin state, for tests)."""
