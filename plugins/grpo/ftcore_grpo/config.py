"""``[grpo]``: the validated table of the grpo method (light: no torch, no trl)."""

from __future__ import annotations

from typing import Any, Literal

from ftcore.config import Section
from ftcore.errors import ConfigError
from pydantic import Field, field_validator

from ftcore_grpo.vllm_config import VLLMSection


class GRPOSection(Section):
    """``[grpo]``: online RL with group-relative advantages (GRPO and its loss family)."""

    renamed = {"hf_compile": "hf_cuda_graph"}

    generation: Literal["hf", "vllm"] = Field(
        "hf",
        description="Who samples completions: hf = the policy's own generate; vllm = a vLLM server (see [grpo.vllm]).",
    )
    vllm: VLLMSection = Field(default_factory=VLLMSection, description="The vLLM server (generation = vllm).")
    sync_interval: int = Field(
        1,
        ge=1,
        description="Push the trained weights (or adapter) to vLLM, or to the generating copy of an async hf run, "
        "every N optimizer steps.",
    )
    num_generations: int = Field(8, ge=2, description="Completions per prompt (the group size G).")
    num_iterations: int = Field(
        1,
        ge=1,
        description="Optimizer steps on each generated batch (mu); > 1 clips against the sampling policy.",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo",
        description="Token aggregation: grpo = mean per sequence, then over sequences; bnpo = mean over the "
        "micro-batch's tokens; dr_grpo = sum / (sequences x max_completion_length); dapo = sum / tokens of the "
        "whole optimizer step.",
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip: the ratio is kept above 1 - epsilon.")
    epsilon_high: float | None = Field(
        None,
        gt=0,
        description="Upper clip: the ratio is kept below 1 + epsilon_high (default: epsilon; DAPO: 0.28).",
    )
    beta: float = Field(
        0.0,
        ge=0,
        description="KL penalty to the reference (the adapter-disabled base under LoRA, a frozen copy under full "
        "fine-tuning); 0 = no reference model.",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the reward std of the group, of the whole batch, or not at all (Dr. GRPO). "
        "true = group, false = none.",
    )
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length out of the loss."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1 = off).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0 = off).")
    min_p: float = Field(
        0.0, ge=0, le=1, description="Drop tokens below min_p x the top probability (0 = off)."
    )
    repetition_penalty: float = Field(1.0, gt=0, description="Penalise tokens already present (1 = off).")
    max_completion_length: int = Field(256, gt=0, description="Tokens per completion at most.")
    stop: list[str] = Field(
        default_factory=list, description="Strings that end a completion (kept in its tokens)."
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Chat template variables for the prompts, over data.chat_template_kwargs (e.g. {enable_thinking = false}).",
    )
    rewards: list[str] = Field(
        default_factory=list,
        description="Reward functions: registry names (gsm8k_accuracy, boxed_accuracy, regex_format, length_penalty, "
        'or a plugin\'s) or "module:function" (the module may sit beside the config file).',
    )
    reward_weights: list[float] | None = Field(None, description="One weight per reward (default 1.0 each).")
    reward_kwargs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='Keyword arguments per reward, e.g. {regex_format = {pattern = "^<answer>"}}.',
    )
    reward_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize",
        description="sum_then_normalize (GRPO): weighted sum, then group normalisation; normalize_then_sum (GDPO): "
        "each reward normalised within its group, weighted and summed, then normalised over the batch.",
    )
    reward_workers: int = Field(
        0,
        ge=0,
        description="Score in N worker processes, sharded by prompt group (0 = in this process); a reward that "
        "raises or passes reward_timeout gives None for that group, counted in the metrics.",
    )
    reward_timeout: float = Field(
        60.0, gt=0, description="Seconds one reward call on one group may take (workers)."
    )
    log_completions_steps: int | None = Field(
        None,
        ge=0,
        description="Append a sample of completions to completions.jsonl every N steps (default: train.logging_steps; 0 = never).",
    )
    log_completions_count: int = Field(8, ge=1, description="Completions per sample in completions.jsonl.")
    hf_batch_size: int | None = Field(
        None, gt=0, description="generation = hf: sequences per generate call (default: the whole batch)."
    )
    hf_cuda_graph: bool = Field(
        True,
        description="generation = hf on a CUDA GPU with sdpa or eager attention: ftcore's decode loop over a static "
        "KV cache, each decode step one CUDA graph replay (captured once per generate call, nothing compiled); "
        "false = transformers' generate. Ignored on CPU.",
    )

    async_prefetch: bool = Field(
        False,
        description="Generate (and score) the next prefetch_depth batches in a background thread while this one "
        "trains; completions may then come from weights up to a few steps old (see importance_sampling).",
    )
    prefetch_depth: int = Field(
        1,
        ge=0,
        description="async_prefetch: batches generated ahead of the one training (0 = generate in the background "
        "thread, but only the batch about to train: no staleness).",
    )
    hf_device: str | None = Field(
        None,
        description="async_prefetch with generation = hf: the device of the generating copy of the policy, e.g. "
        '"cuda:1" (default: the policy\'s device).',
    )
    importance_sampling: Literal["token", "sequence", "off"] | None = Field(
        None,
        description="Correct for the generator's log-probs differing from the trainer's (staleness, kernels): weight "
        "each token's loss by rho = p_trainer / p_generator per token, or by the sequence's rho; off = no "
        "correction (default: token with async_prefetch, else off). Needs log-probs from the generator.",
    )
    importance_sampling_mode: Literal["truncate", "mask"] = Field(
        "truncate",
        description="truncate: use min(rho, cap); mask: drop tokens (or sequences) whose rho exceeds the cap.",
    )
    importance_sampling_cap: float = Field(
        2.0, gt=0, description="The cap C of the importance-sampling ratio."
    )
    importance_sampling_kl: bool = Field(
        False,
        description="beta > 0: weight the KL term's tokens by the same correction, times the current-to-old "
        "ratio, so that it estimates the KL of the trainer's policy although another one sampled.",
    )
    off_policy_mask_threshold: float | None = Field(
        None,
        gt=0,
        description="Off-policy sequence masking: leave out sequences with a negative advantage whose mean "
        "per-token KL from the generator's to the trainer's log-probs exceeds this (e.g. 0.5); None = off.",
    )
    streaming_groups: int = Field(
        0,
        ge=0,
        description="Generate n prompt groups at a time and score each chunk while the next one generates "
        "(0 = the whole batch in one request).",
    )
    replay_buffer_size: int = Field(
        0,
        ge=0,
        description="Keep up to N prompt groups whose rewards varied and put them in the place of groups whose "
        "rewards did not (no learning signal) in later batches, newest first, each once (0 = off).",
    )
    replay_recompute_logps: bool = Field(
        True,
        description="Replayed groups: take the generator log-probs as the trainer's current ones (no "
        "importance-sampling correction of their age); false = correct them against their generator's.",
    )
    reroll_start_fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Once this share of the training steps is done, prompts whose whole group scored 0 are "
        "generated again in later batches (1.0 = never).",
    )
    reroll_max_groups: int = Field(
        1,
        ge=1,
        description="Re-rolled prompt groups at most per batch (they replace the batch's last groups).",
    )
    packed_forward: bool = Field(
        True,
        description="Pack each micro-batch's rows without padding for the policy, reference and old log-prob "
        "forwards, and score completion tokens with grpo's log-prob kernels; false = TRL's padded forward.",
    )
    skip_zero_advantage_batches: bool = Field(
        True,
        description="Skip forward and backward of micro-batches whose advantages are all zero (with beta = 0 "
        "their loss and gradient are exactly zero); counted in skipped_zero_adv_batches.",
    )

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _bool_scale(cls, value):
        return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value


def importance_sampling(grpo) -> str:
    """The importance-sampling level in effect: the key, or its default (token with async_prefetch)."""
    if grpo.importance_sampling is not None:
        return grpo.importance_sampling
    return "token" if grpo.async_prefetch else "off"


def check(config) -> None:
    """Cross-table checks of a grpo run; raises ``ConfigError`` naming the key."""
    grpo, train = config.grpo, config.train
    if train.packing:
        raise ConfigError(
            "grpo trains on generated completions and cannot pack rows: set packing = false",
            key="train.packing",
        )
    if not grpo.rewards:
        raise ConfigError(
            'name at least one reward function, e.g. rewards = ["gsm8k_accuracy"] or ["mymodule:my_reward"]',
            key="grpo.rewards",
        )
    for name in grpo.rewards:
        if name.count(":") > 1 or name.startswith(":") or name.endswith(":"):
            raise ConfigError(f'{name!r} is neither a reward name nor "module:function"', key="grpo.rewards")
    if len(set(grpo.rewards)) != len(grpo.rewards):
        raise ConfigError(f"a reward is listed twice in {grpo.rewards}", key="grpo.rewards")
    if grpo.reward_weights is not None and len(grpo.reward_weights) != len(grpo.rewards):
        raise ConfigError(
            f"{len(grpo.reward_weights)} weights for {len(grpo.rewards)} rewards {grpo.rewards}: give one weight "
            "per reward, or remove reward_weights",
            key="grpo.reward_weights",
        )
    unknown = sorted(set(grpo.reward_kwargs) - set(grpo.rewards))
    if unknown:
        raise ConfigError(
            f"reward_kwargs for {unknown}, which are not in rewards {grpo.rewards}", key="grpo.reward_kwargs"
        )
    batch = train.micro_batch_size * train.gradient_accumulation_steps
    if batch % grpo.num_generations:
        raise ConfigError(
            f"num_generations ({grpo.num_generations}) must divide the generation batch, micro_batch_size x "
            f"gradient_accumulation_steps = {train.micro_batch_size} x {train.gradient_accumulation_steps} = {batch} "
            f"completions per step: change one of them (e.g. micro_batch_size = {grpo.num_generations})",
            key="grpo.num_generations",
        )
    if config.data.val_fraction and train.eval_steps and train.micro_batch_size % grpo.num_generations:
        raise ConfigError(
            f"evaluation samples whole groups per micro-batch: micro_batch_size ({train.micro_batch_size}) must be "
            f"a multiple of num_generations ({grpo.num_generations})",
            key="train.micro_batch_size",
        )
    if grpo.hf_device is not None and not (grpo.async_prefetch and grpo.generation == "hf"):
        raise ConfigError(
            "hf_device places the generating copy of the policy of an async hf run: set async_prefetch = true "
            'and generation = "hf", or remove hf_device',
            key="grpo.hf_device",
        )
    if grpo.max_completion_length >= train.sequence_len:
        raise ConfigError(
            f"max_completion_length ({grpo.max_completion_length}) leaves no room for a prompt within "
            f"train.sequence_len ({train.sequence_len}): lower it or raise sequence_len",
            key="grpo.max_completion_length",
        )
