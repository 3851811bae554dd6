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
    """Everything a method needs to build its trainer."""

    config: Config
    plugins: Plugins
    model: Any
    tokenizer: Any
    output_dir: Path
    callbacks: list[Any] = field(default_factory=list)
    """The core's callbacks (metrics, progress, report, checkpoints, signals) and the plugins'."""
    data_fingerprint: str | None = None
    """Set by the method once its data is prepared; stored in checkpoints and checked on resume."""


@dataclass
class RunResult:
    """What ``after_train`` receives."""

    output_dir: Path
    global_step: int
    metrics: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    model: Any = None
    """The trained model in memory (for notebooks and tests)."""
