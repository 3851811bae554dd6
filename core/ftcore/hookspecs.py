"""The hook contract between the ftcore core and its plugins.

A plugin is a module (or object) with functions decorated by ``ftcore.hookspecs.hookimpl`` whose
names match the specs below (a name matching no spec is an error). An implementation may accept
any subset of a spec's arguments. ``docs/plugins.md`` walks through a complete plugin.
Plugins are found through the ``ftcore`` entry-point group and enabled by listing their
name in the config's ``plugins = [...]``; core features are built-in plugins, always on.

The run context: every hook that runs during ``ftcore run`` once the config is validated
(``restore_checkpoint_state``, the model hooks, ``trainer_callbacks``, ``compute_loss``,
``checkpoint_state``, ``after_train``) also takes ``run``, a ``ftcore.methods.Run``: ``run.config``, ``run.output_dir``, ``run.model`` and
``run.tokenizer`` (as far as loading has got), ``run.trainer`` (once built), ``run.stash`` (plugin
state for this run, keyed by plugin name) and ``run.log_metrics({name: number})`` (values that join
the next logged row: metrics.jsonl, the ``report_to`` trackers and report.html). Config-time hooks
(``config_section``, ``validate_config``, ``register_*``) have no run. (Contract change, issue 15:
``run`` was added to the run-time hooks; implementations without it keep working.)

Order of calls for ``ftcore run`` (see ``pipeline.py``)::

    config_section -> validate_config
    register_formats / register_methods / register_rewards   (registries, lazy)
    restore_checkpoint_state                  (--resume only; before the model loads)
    before_model_load -> model_load_kwargs -> load_model -> patch_model
        -> (adapter) -> after_model_load
    trainer_callbacks -> the method builds its trainer (data prepared)
    training: compute_loss (every micro-batch), checkpoint_state (every save), callbacks
    final save -> after_train

Within a training step the trainer calls, in order: ``compute_loss`` for each micro-batch, the
callbacks' ``on_step_end``, then (on logging steps) ``on_log`` and (on save steps) ``on_save``.
Callbacks run in this order for every event: the core's metrics route (adds ``log_metrics``
values to the row), Hugging Face's flow callback and ``report_to`` trackers, the core's callbacks
(metrics.jsonl, progress, report, checkpoint -- which calls ``checkpoint_state`` --, signals), then
the plugins' callbacks, in the order the config lists the plugins. So a value given to
``log_metrics`` in ``on_step_end`` lands in that step's row; one given in ``on_log`` lands in the
next row.

Registries receive a ``register(name, target)`` callable. ``target`` is an import string
(``"package.module:attribute"``) or a light object; import strings keep ``ftcore plugins``,
``validate`` and ``schema`` free of torch. A duplicate name across plugins is an error naming
both.

Plugin modules must not import torch (or anything heavy) at import time: import inside the
hook bodies. ``ftcore validate`` imports the method class and the format classes a config names,
so their modules must be light too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import click
    from pydantic import BaseModel

    from ftcore.config import Config
    from ftcore.methods import Run, RunResult

hookspec = pluggy.HookspecMarker("ftcore")
hookimpl = pluggy.HookimplMarker("ftcore")

Register = Callable[[str, Any], None]


@hookspec
def config_section() -> type[BaseModel] | None:
    """Return the model of this plugin's config table (a ``ftcore.config.Section`` subclass), or None.

    The table is named after the plugin (its entry-point name, or the ``name`` attribute an
    in-house plugin module declares; else its dotted path). Called for each enabled plugin
    while the config is validated, and for every installed plugin by ``ftcore schema``; never
    imports torch. ``Section`` makes unknown keys errors; any other class is a ``PluginError``.
    """


@hookspec
def validate_config(config: Config) -> None:
    """Cross-table checks after every table validated; raise ``ftcore.errors.ConfigError``.

    Runs in ``ftcore validate`` and at the start of ``ftcore run``; must not import torch.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add click commands to the ``ftcore`` CLI (e.g. ``vllm-serve``).

    Called for every installed plugin when the CLI starts, enabled or not (commands are not
    tied to a config). Keep the module import light.
    """


@hookspec
def register_formats(register: Register) -> None:
    """Register dataset row formats: ``register("alpaca", "pkg.formats:Alpaca")``.

    A format turns raw rows into one canonical row schema (``messages``,
    ``prompt_completion``, ``text``, ``preference``, ``prompt_only``, ``tokens``); see
    ``ftcore.data.formats.RowFormat`` for the interface: a subclass sets ``schema``, ``fields``
    (the columns it reads, which a dataset's ``fields`` table can remap), ``optional_fields`` and
    ``Options`` (its ``options`` table), and implements ``convert(row) -> canonical row``, raising
    ``ValueError`` for a bad row (the core names the file and row, or skips and counts it).
    """


@hookspec
def register_methods(register: Register) -> None:
    """Register training methods: ``register("dpo", "ftcore_dpo.method:DPOMethod")``.

    A method is a class following ``ftcore.methods.Method``: it names the row schemas it
    accepts and builds an HF-Trainer-compatible trainer from a ``ftcore.methods.Run``.
    """


@hookspec
def register_rewards(register: Register) -> None:
    """Register named reward functions ``fn(completions, **columns) -> list[float | None]``."""


@hookspec
def before_model_load(config: Config, model_config: Any, run: Run) -> None:
    """Class-level patches that need the HF ``PretrainedConfig`` (``model_config``).

    Runs after the model config is read and before any weights load. Use it to patch the
    modelling classes of ``model_config.model_type`` (liger, cce). May mutate
    ``model_config``.
    """


@hookspec
def model_load_kwargs(config: Config, kwargs: dict[str, Any], run: Run) -> None:
    """Adjust the keyword arguments of ``from_pretrained`` / ``from_config`` in place.

    Keys include ``dtype``, ``attn_implementation``, ``experts_implementation``,
    ``quantization_config``, ``device_map``, ``config``. Runs after ``before_model_load``.
    """


@hookspec(firstresult=True)
def load_model(config: Config, kwargs: dict[str, Any], run: Run) -> Any:
    """Build and return the model, or None to let the next implementation do it.

    The Hugging Face loader is built in and runs last (``trylast``); a plugin returning a
    model here replaces it. ``kwargs`` are the final load arguments.
    """


@hookspec
def patch_model(config: Config, model: Any, run: Run) -> None:
    """Module swaps and forward patches on the built model, before adapters are added.

    ``run.tokenizer`` is loaded (and the embeddings resized to it); keep what a patch needs later
    (a hook handle, a counter) in ``run.stash``.
    """


@hookspec
def after_model_load(config: Config, model: Any, run: Run) -> None:
    """Runs after adapters are added (``model`` may be a peft model). Verify patches here."""


@hookspec(firstresult=True)
def compute_loss(config: Config, model: Any, batch: dict[str, Any], num_items_in_batch: Any, run: Run) -> Any:
    """Return the training loss for ``batch`` (a scalar tensor), or None for the default (the
    model's forward, with the output layer and cross-entropy computed in chunks: ``ftcore.loss``).

    Called inside the trainer's ``compute_loss`` for every micro-batch. The loss must be the
    sum over trained tokens divided by ``num_items_in_batch`` (the number of trained tokens
    in the whole gradient-accumulation step) when that is given, so that the loss does not
    depend on ``gradient_accumulation_steps``. Fused/chunked losses (cce, liger) live here.
    """


@hookspec
def trainer_callbacks(config: Config, run: Run) -> list[Any] | None:
    """Return extra ``transformers.TrainerCallback`` instances for the trainer.

    Called once the model is loaded (``run.model``, ``run.tokenizer`` set), before the method builds
    its trainer. The callbacks run after the core's (see the order above) and before the divergence
    guard, which cancels any save once the run has diverged; give them ``run`` to reach
    ``run.log_metrics`` and ``run.stash``.
    """


@hookspec
def checkpoint_state(config: Config, run: Run) -> dict[str, Any] | None:
    """Return this plugin's state to store in a checkpoint, or None for none.

    Called on every checkpoint save (from the core's checkpoint callback, in ``on_save``, after the
    trainer wrote its files). The values of all plugins are saved together in the checkpoint's
    ``plugin_state.pt`` as ``{plugin name: state}`` and loaded with ``torch.load(weights_only=True)``,
    so a state is made of dicts, lists, tuples, strings, numbers, booleans, None and tensors. Each
    plugin gets back only its own state. Online-RL methods keep replay buffers, rollout positions
    and generation-server state here; ``return run.stash.get("myplugin")`` is the usual body.
    """


@hookspec
def restore_checkpoint_state(config: Config, state: dict[str, Any], run: Run) -> None:
    """Restore what this plugin returned from ``checkpoint_state``: on ``--resume``, before the model
    loads, so every later hook and callback finds it (usually ``run.stash["myplugin"] = state``).

    Called only for a plugin that saved a state in the checkpoint resumed from.
    """


@hookspec
def after_train(config: Config, result: RunResult, run: Run) -> None:
    """Runs once after training and the final save (``result`` is a ``ftcore.methods.RunResult``).

    Also after a run stopped by a signal or by divergence, with ``result.interrupted`` true and no
    final model written; a diverged run then raises ``ftcore.errors.TrainingDiverged``. Trackers are
    closed by then: ``run.log_metrics`` raises; write extra files to ``run.output_dir``.
    """
