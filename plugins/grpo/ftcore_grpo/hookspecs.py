"""The `grpo` plugin's extension point: other plugins supply the rollouts of a grpo-family run.

A rollout is everything between the prompt rows and the loss: generation and scoring. By default
grpo's ``RolloutProducer`` generates with the configured backend (``hf`` / ``vllm``) and scores
with the configured rewards. A plugin that serves rollouts another way (an environment that runs
the whole episode, a reward that needs the model) implements the hook below in its plugin module::

    from ftcore.hookspecs import hookimpl

    @hookimpl(optionalhook=True)  # optional: the spec is grpo's, added when a grpo run starts
    def grpo_rollout_producer(run, generator, scorer, sampling):
        if run.config.my_env.episodes:  # the plugin's own [my_env] table: only the runs it serves
            return MyProducer(generator, scorer, sampling, seed=run.config.train.seed)
        return None  # grpo's own producer

A producer has ``produce(rows, index) -> Rollout`` (``ftcore_grpo.rollout``: rows in, one
``Completion`` per row, ``rewards[sample][reward]`` out, prompt groups consecutive) and
``close()``; subclassing ``RolloutProducer`` and overriding ``produce`` keeps both. A method that
builds on grpo (``train.method = "mine"``) may instead subclass ``ftcore_grpo.method.GRPOMethod``
and override ``rewards(run)`` and ``producer(run, generator, scorer, sampling)``.
"""

from __future__ import annotations

from ftcore.hookspecs import hookspec


class GRPOHooks:
    """Hook specs added to the run's plugin manager by grpo-family methods."""

    @hookspec(firstresult=True)
    def grpo_rollout_producer(self, run, generator, scorer, sampling):
        """Return the producer of this run's rollouts, or None to leave it to the next plugin (and
        finally to grpo's ``RolloutProducer``). ``generator`` is the configured backend, already
        built (``generate``, ``sync_weights``, ``close``); ``scorer`` the configured rewards
        (``RewardScorer``); ``sampling`` the ``SamplingParams`` of ``[grpo]``. Called once per run,
        on every process."""


def add_to(plugins) -> None:
    """Add grpo's hook specs to ``plugins`` (once)."""
    if (
        not hasattr(plugins.hook, "grpo_rollout_producer")
        or not plugins.hook.grpo_rollout_producer.has_spec()
    ):
        plugins.pm.add_hookspecs(GRPOHooks)
