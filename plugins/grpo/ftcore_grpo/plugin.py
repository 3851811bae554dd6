"""Hook implementations of the `grpo` plugin (light: no torch, transformers or trl at import)."""

from __future__ import annotations

from ftcore.hookspecs import hookimpl

from ftcore_grpo.config import GRPOSection, check

BUILTIN_REWARDS = {
    "gsm8k_accuracy": "ftcore_grpo.rewards:gsm8k_accuracy",
    "boxed_accuracy": "ftcore_grpo.rewards:boxed_accuracy",
    "regex_format": "ftcore_grpo.rewards:regex_format",
    "length_penalty": "ftcore_grpo.rewards:length_penalty",
}


@hookimpl
def config_section():
    return GRPOSection


@hookimpl
def register_methods(register):
    register("grpo", "ftcore_grpo.method:GRPOMethod")


@hookimpl
def register_rewards(register):
    for name, target in BUILTIN_REWARDS.items():
        register(name, target)


@hookimpl
def validate_config(config):
    if config.train.method == "grpo":
        check(config)


@hookimpl
def checkpoint_state(run):
    rollout_state = getattr(run.trainer, "rollout_state", None)
    return rollout_state() if rollout_state is not None else None


@hookimpl
def restore_checkpoint_state(state, run):
    run.stash.setdefault("grpo", {})["checkpoint"] = state  # the trainer reads it when it is built


@hookimpl
def register_commands(cli):
    from ftcore_grpo.commands import vllm_serve

    cli.add_command(vllm_serve)
