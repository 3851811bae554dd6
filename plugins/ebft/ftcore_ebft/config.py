"""``[ebft]``: the validated table of the ebft method (light: no torch)."""

from __future__ import annotations

from typing import Literal

from ftcore.config import Section
from ftcore.errors import ConfigError
from pydantic import Field, field_validator


class EBFTSection(Section):
    """``[ebft]``: energy-based fine-tuning, rewards from feature matching against reference completions."""

    mode: Literal["structured", "strided"] = Field(
        "structured",
        description="structured = prompts with a ground_truth, sampled by grpo's backends (needs the grpo plugin); "
        "strided = unstructured text, blocks generated at anchors every `stride` tokens in one forward pass.",
    )
    feature_layers: list[float] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        description="Hidden layers the features come from, as fractions of depth (layer round(f x L)); each "
        "layer L2-normalised, then concatenated.",
    )
    embed_method: Literal["last_token", "mean_pooling", "completion_mean", "concat"] = Field(
        "last_token",
        description="Pooling over tokens: the last token; the mean over all tokens; the mean over the completion; "
        "or the states at 25%, 50% and 75% of the completion concatenated.",
    )
    use_whitening: bool = Field(
        False,
        description="Whiten features with the SVD of each group's generated features (applied to the reference too).",
    )
    alignment_coef: float = Field(1.0, ge=0, description="Weight of the cosine to the reference features.")
    diversity_coef: float = Field(
        1.0, ge=0, description="Weight of the mean dot product with the group's other samples (off at n = 1)."
    )
    feature_device: str | None = Field(
        None,
        description="Full fine-tuning: device of the frozen feature copy (e.g. cpu, cuda:1; default: the policy's).",
    )
    adaptive_max_tokens: bool = Field(
        True,
        description="structured: sample at most gt_length_multiplier x the longest reference of the batch "
        "(capped by grpo.max_completion_length).",
    )
    gt_length_multiplier: float = Field(
        1.5, ge=0.1, description="structured: multiplier of the reference length for adaptive_max_tokens."
    )
    stride: int = Field(8, ge=1, description="strided: tokens between anchors.")
    anchor_offset: int = Field(0, ge=0, description="strided: position of the first anchor candidate.")
    min_completion_prefix: int = Field(
        0, ge=0, description="strided: anchors at least this many tokens past the prompt."
    )
    context_length: int = Field(
        8, ge=1, description="strided: original tokens before its anchor that a generated block attends to."
    )
    generate_max_len: int = Field(8, ge=1, description="strided: tokens generated per block.")
    n_samples_per_prompt: int = Field(4, ge=1, description="strided: samples per anchor (the group).")
    temperature: float = Field(0.6, gt=0, description="strided: sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="strided: nucleus sampling (1 = off).")
    advantage_estimator: Literal["rloo", "group_norm", "reinforce"] = Field(
        "rloo",
        description="strided: rloo = reward minus the mean of the others; group_norm = (r - mean) / std; "
        "reinforce = the reward (used whenever n_samples_per_prompt = 1).",
    )
    rl_coef: float = Field(1.0, ge=0, description="strided: weight of the policy-gradient loss.")
    ce_coef: float = Field(
        0.0, ge=0, description="strided: weight of cross-entropy on the reference tokens (e.g. 0.03)."
    )
    lm_head_chunk: int = Field(
        1024,
        ge=1,
        description="strided: positions per chunk of the output layer (logits never built at once).",
    )

    @field_validator("feature_layers")
    @classmethod
    def _fractions(cls, value):
        if not value:
            raise ValueError("name at least one depth fraction, e.g. [0.25, 0.5, 0.75]")
        if any(not 0 < f <= 1 for f in value):
            raise ValueError(f"fractions of depth must be in (0, 1], got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"a fraction is listed twice in {value}")
        return value


def check(config) -> None:
    """Cross-table checks of an ebft run; raises ``ConfigError`` naming the key and the fix."""
    ebft, train = config.ebft, config.train
    if train.packing:
        raise ConfigError(
            "ebft trains on generated completions and cannot pack rows: set packing = false",
            key="train.packing",
        )
    if not ebft.alignment_coef and not ebft.diversity_coef:
        raise ConfigError(
            "alignment_coef and diversity_coef are both 0: the reward is 0", key="ebft.alignment_coef"
        )
    if ebft.mode == "structured":
        check_structured(config)
    else:
        check_strided(config)


def check_structured(config) -> None:
    if "grpo" not in config.plugins:
        raise ConfigError(
            'structured mode samples and trains through the grpo plugin: set plugins = ["grpo", "ebft"] '
            '(or mode = "strided")',
            key="plugins",
        )
    grpo, train, ebft = config.grpo, config.train, config.ebft
    if grpo.rewards:
        raise ConfigError(
            f"ebft's reward is the feature match; remove grpo.rewards ({grpo.rewards})", key="grpo.rewards"
        )
    if grpo.reward_workers:
        raise ConfigError(
            "the ebft reward runs the model and must score in the training process: set reward_workers = 0",
            key="grpo.reward_workers",
        )
    for key in ("async_prefetch", "streaming_groups"):  # scoring beside generation or training
        if getattr(grpo, key):
            raise ConfigError(
                f"the ebft reward runs the policy's own weights (the adapter switched off under LoRA), so it "
                f"cannot score while the policy generates or trains in another thread: remove grpo.{key}",
                key=f"grpo.{key}",
            )
    for key in ("ce_coef", "rl_coef"):
        if getattr(ebft, key) != EBFTSection.model_fields[key].default:
            raise ConfigError(
                f"{key} applies to strided mode; structured mode trains with grpo's loss: remove it",
                key=f"ebft.{key}",
            )
    batch = train.micro_batch_size * train.gradient_accumulation_steps
    if batch % grpo.num_generations:
        raise ConfigError(
            f"num_generations ({grpo.num_generations}) must divide micro_batch_size x gradient_accumulation_steps "
            f"= {batch}: change one of them (e.g. micro_batch_size = {grpo.num_generations})",
            key="grpo.num_generations",
        )
    if grpo.max_completion_length >= train.sequence_len:
        raise ConfigError(
            f"max_completion_length ({grpo.max_completion_length}) leaves no room for a prompt within "
            f"train.sequence_len ({train.sequence_len}): lower it or raise sequence_len",
            key="grpo.max_completion_length",
        )


def check_strided(config) -> None:
    ebft, train = config.ebft, config.train
    if ebft.generate_max_len >= train.sequence_len:
        raise ConfigError(
            f"generate_max_len ({ebft.generate_max_len}) must be below train.sequence_len ({train.sequence_len}): "
            "a block needs reference tokens to match",
            key="ebft.generate_max_len",
        )
    if ebft.anchor_offset + ebft.generate_max_len > train.sequence_len:
        raise ConfigError(
            f"anchor_offset ({ebft.anchor_offset}) + generate_max_len ({ebft.generate_max_len}) exceeds "
            f"train.sequence_len ({train.sequence_len}): no anchor fits; lower anchor_offset",
            key="ebft.anchor_offset",
        )
    if config.data.val_fraction or any(dataset.eval for dataset in config.datasets):
        raise ConfigError(
            "strided mode has no evaluation pass: remove data.val_fraction and eval = true datasets",
            key="data.val_fraction" if config.data.val_fraction else "datasets",
        )
    if config.model.compile:
        raise ConfigError(
            "strided mode builds a sequence of another length (and mask) for every document, which torch.compile "
            "would recompile for: set compile = false",
            key="model.compile",
        )
    if config.model.attention in ("flash_attention_2", "varlen"):
        raise ConfigError(
            f"strided mode needs an attention that takes a block mask (flex_attention on a GPU, sdpa or eager), "
            f"not {config.model.attention!r}",
            key="model.attention",
        )
