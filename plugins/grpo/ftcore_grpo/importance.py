"""Importance-sampling correction of completions the trainer's policy did not sample itself.

A completion's tokens come from the generator: older weights (async prefetch, ``sync_interval``)
and other kernels (vLLM). The ratio rho = p_trainer / p_generator of each token (or of the whole
sequence: the product over its tokens) weights its loss, so that the gradient is that of the
trainer's own distribution; ``cap`` bounds the variance, by truncation (min(rho, C)) or by
masking (0 where rho > C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Correction:
    """The weights of one batch, shaped (B, T) for token level and (B, 1) for sequence level."""

    weights: torch.Tensor
    ratio: torch.Tensor
    """rho before the cap, on the completions' tokens (token level) or per sequence (sequence level)."""
    capped: torch.Tensor
    """Where rho exceeded the cap (truncated or masked), the same entries as ``ratio``."""
    logp_difference: torch.Tensor
    """|log p_trainer - log p_generator| of every completion token."""


def importance_weights(
    trainer_logps: torch.Tensor,
    generator_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float = 2.0,
) -> Correction:
    """The capped ratio p_trainer / p_generator per token or per sequence.

    ``trainer_logps`` and ``generator_logps`` are (B, T) log-probs of the sampled tokens, ``mask``
    (B, T) marks the completion tokens. A NaN generator log-prob (not reported) counts as a ratio
    of 1. Padding gets weight 0 at token level.
    """
    mask = mask.bool()
    difference = torch.nan_to_num(trainer_logps - generator_logps, nan=0.0).masked_fill(~mask, 0.0)
    if level == "sequence":
        log_ratio = difference.sum(-1, keepdim=True)
    elif level == "token":
        log_ratio = difference
    else:
        raise ValueError(f"importance_sampling level must be 'token' or 'sequence', not {level!r}")
    ratio = torch.exp(log_ratio.clamp(max=80.0))
    capped = ratio > cap
    if mode == "truncate":
        weights = ratio.clamp(max=cap)
    elif mode == "mask":
        weights = ratio.masked_fill(capped, 0.0)
    else:
        raise ValueError(f"importance_sampling_mode must be 'truncate' or 'mask', not {mode!r}")
    selected = mask if level == "token" else torch.ones_like(ratio, dtype=torch.bool)
    if level == "token":
        weights = weights.masked_fill(~mask, 0.0)
    return Correction(
        weights=weights,
        ratio=ratio[selected],
        capped=capped[selected],
        logp_difference=difference[mask].abs(),
    )


def metrics(correction: Correction) -> dict[str, float]:
    """``sampling/...`` metrics of one batch (NaN where the batch has no completion token)."""

    def reduce(values: torch.Tensor, how) -> float:
        return how(values.float()).item() if values.numel() else float("nan")

    return {
        "sampling/importance_sampling_ratio/min": reduce(correction.ratio, torch.min),
        "sampling/importance_sampling_ratio/mean": reduce(correction.ratio, torch.mean),
        "sampling/importance_sampling_ratio/max": reduce(correction.ratio, torch.max),
        "sampling/importance_sampling_capped_fraction": reduce(correction.capped, torch.mean),
        "sampling/sampling_logp_difference/mean": reduce(correction.logp_difference, torch.mean),
        "sampling/sampling_logp_difference/max": reduce(correction.logp_difference, torch.max),
    }
