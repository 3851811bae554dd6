"""Hook implementations of the `dpo` plugin (kept light: no torch, transformers or trl at import)."""

from __future__ import annotations

from typing import Literal

from ftcore.config import Section
from ftcore.errors import ConfigError, did_you_mean
from ftcore.hookspecs import hookimpl
from pydantic import Field, field_validator

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
"""The loss types of TRL's ``DPOConfig.loss_type`` (a test keeps this list equal to the installed TRL's)."""

F_DIVERGENCE_LOSSES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
"""Loss types that accept an ``f_divergence_type`` other than ``reverse_kl`` (as TRL checks)."""


class DPOSection(Section):
    """``[dpo]``: Direct Preference Optimization through TRL's ``DPOTrainer``."""

    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference model (tau for ipo)."
    )
    loss_type: list[str] = Field(
        default_factory=lambda: ["sigmoid"],
        description=f"One or more TRL DPO losses, summed with loss_weights: {', '.join(LOSS_TYPES)}.",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight per loss_type (default: 1.0 each)."
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Probability of a flipped label (sigmoid = cDPO, robust) or EXO's epsilon; not with ipo.",
    )
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO divergence between policy and reference."
    )
    ld_alpha: float | None = Field(
        None, ge=0, le=1, description="LD-DPO weight of the tokens past the shorter completion."
    )
    use_weighting: bool = Field(False, description="WPO weighting of pairs by the policy's probabilities.")
    discopop_tau: float = Field(0.05, gt=0, description="Temperature of the discopop loss.")
    precompute_ref_log_probs: bool = Field(
        False,
        description="Compute the reference log-probs once before training (full fine-tune: no reference copy in memory).",
    )
    precompute_ref_batch_size: int | None = Field(
        None, gt=0, description="Batch size of that pass (default: micro_batch_size)."
    )
    max_prompt_length: int | None = Field(
        None,
        gt=0,
        description="Prompt tokens allowed (default: train.sequence_len - 1); longer prompts are dropped or raise.",
    )
    max_completion_length: int | None = Field(
        None,
        gt=0,
        description="Tokens allowed per completion (default: what train.sequence_len leaves after the prompt).",
    )

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


@hookimpl
def config_section():
    return DPOSection


@hookimpl
def register_methods(register):
    register("dpo", "ftcore_dpo.method:DPOMethod")


@hookimpl
def register_formats(register):
    register("preference", "ftcore_dpo.formats:Preference")
    register("hh_rlhf", "ftcore_dpo.formats:HHRLHF")


@hookimpl
def validate_config(config):
    if config.train.method != "dpo":
        return
    dpo = config.dpo
    if config.train.packing:
        raise ConfigError(
            "dpo trains on (prompt, chosen, rejected) pairs and cannot pack rows: set packing = false",
            key="train.packing",
        )
    for name in dpo.loss_type:
        if name not in LOSS_TYPES:
            raise ConfigError(
                f"unknown loss type {name!r}{did_you_mean(name, LOSS_TYPES)}; valid: {', '.join(LOSS_TYPES)}",
                key="dpo.loss_type",
            )
    if dpo.loss_weights is not None and len(dpo.loss_weights) != len(dpo.loss_type):
        raise ConfigError(
            f"{len(dpo.loss_weights)} weights for {len(dpo.loss_type)} loss types {dpo.loss_type}: give one weight "
            "per loss type, or remove loss_weights",
            key="dpo.loss_weights",
        )
    if dpo.label_smoothing and "ipo" in dpo.loss_type:
        raise ConfigError(
            "label_smoothing does not apply to the ipo loss (its regulariser is beta): remove label_smoothing",
            key="dpo.label_smoothing",
        )
    if "exo_pair" in dpo.loss_type and not dpo.label_smoothing:
        raise ConfigError(
            "the exo_pair loss needs label_smoothing > 0 (the EXO paper uses 1e-3)", key="dpo.label_smoothing"
        )
    if dpo.use_weighting and {"aot", "aot_unpaired"} & set(dpo.loss_type):
        raise ConfigError(
            "use_weighting does not work with the aot losses (they reorder pairs)", key="dpo.use_weighting"
        )
    unsupported = sorted(set(dpo.loss_type) - F_DIVERGENCE_LOSSES)
    if dpo.f_divergence_type != "reverse_kl" and unsupported:
        raise ConfigError(
            f"f_divergence_type = {dpo.f_divergence_type!r} does not apply to {', '.join(unsupported)}; "
            f"use it with {', '.join(sorted(F_DIVERGENCE_LOSSES))}, or keep reverse_kl",
            key="dpo.f_divergence_type",
        )
    if dpo.max_prompt_length is not None and dpo.max_prompt_length >= config.train.sequence_len:
        raise ConfigError(
            f"max_prompt_length ({dpo.max_prompt_length}) leaves no room for a completion within "
            f"train.sequence_len ({config.train.sequence_len}): lower it or raise sequence_len",
            key="dpo.max_prompt_length",
        )
