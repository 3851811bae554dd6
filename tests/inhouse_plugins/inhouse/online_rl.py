"""An in-house online-RL method (TRL's GRPOTrainer, generation by the model itself), written only
against the core's contract: the method and reward registries, ``prompt_only`` rows from the
``prompt`` format, the shared training arguments and callbacks, and plugin state in checkpoints.

It shows that an online-RL method fits without core changes; the real GRPO plugin (vLLM server,
async rollouts, importance-sampling correction) comes in its own package.
"""

import functools

from ftcore.config import Section
from ftcore.hookspecs import hookimpl
from pydantic import Field

name = "online_rl"


class OnlineRLSection(Section):
    """``[online_rl]``: reward names from the reward registry, and the rollout shape."""

    rewards: list[str] = Field(default_factory=lambda: ["mentions_answer"])
    num_generations: int = 2
    max_completion_length: int = 8


def mentions_answer(completions, answer, **kwargs):
    """1.0 when the completion contains the final number of a gsm8k answer, else 0.0."""
    return [
        float(solution.split("####")[-1].strip() in text)
        for text, solution in zip(completions, answer, strict=True)
    ]


def shorter_is_better(completions, **kwargs):
    return [-len(text) / 100 for text in completions]


def rollout_state(run) -> dict:
    """What a replay buffer or rollout position would be: kept in the run's stash, saved with every
    checkpoint, restored on --resume."""
    return run.stash.setdefault(name, {"scored": 0})


def counting(reward, run):
    """``reward``, counting the completions it scores in the run's rollout state (logged as a metric)."""

    @functools.wraps(reward)  # TRL names the reward metrics after the function
    def scored(completions, **columns):
        state = rollout_state(run)
        state["scored"] += len(completions)
        run.log_metrics({"online_rl/scored": state["scored"]})
        return reward(completions=completions, **columns)

    return scored


class ToyGRPO:
    row_schemas = ("prompt_only",)

    def build_trainer(self, run):
        from ftcore.data import load_rows
        from ftcore.data.cache import data_fingerprint
        from ftcore.data.prepare import dataset_specs
        from ftcore.train import one_gpu_per_process, remove_default_printer, training_arguments
        from trl import GRPOConfig, GRPOTrainer

        config, section = run.config, run.config.online_rl
        train, _ = load_rows(config, run.plugins, self.row_schemas)
        run.data_fingerprint = data_fingerprint(
            config, dataset_specs(config, run.plugins, self.row_schemas), run.plugins
        )
        rewards = [run.plugins.registry("reward").get(reward) for reward in section.rewards]
        rewards[0] = counting(rewards[0], run)  # every reward scores each completion: count once
        args = one_gpu_per_process(
            GRPOConfig(
                **training_arguments(config, run.output_dir, has_eval=False),
                num_generations=section.num_generations,
                max_completion_length=section.max_completion_length,
            )
        )
        trainer = GRPOTrainer(
            model=run.model, reward_funcs=rewards, args=args, train_dataset=train,
            processing_class=run.tokenizer, callbacks=run.callbacks,
        )  # fmt: skip
        remove_default_printer(trainer)
        return trainer


@hookimpl
def config_section():
    return OnlineRLSection


@hookimpl
def register_methods(register):
    register("toy_grpo", "inhouse.online_rl:ToyGRPO")


@hookimpl
def register_rewards(register):
    register("mentions_answer", "inhouse.online_rl:mentions_answer")
    register("shorter_is_better", "inhouse.online_rl:shorter_is_better")


@hookimpl
def checkpoint_state(run):
    return dict(rollout_state(run))


@hookimpl
def restore_checkpoint_state(state, run):
    run.stash[name] = dict(state)
