"""The EBFT reward of a group of samples, its diagnostics, and the strided mode's advantages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ftcore_ebft.features import whiten


@dataclass
class GroupRewards:
    """Per sample of a group: the reward and its two terms; the group's CFM loss."""

    rewards: torch.Tensor
    alignment: torch.Tensor
    diversity: torch.Tensor
    cfm_loss: float


def group_rewards(
    generated: torch.Tensor,
    reference: torch.Tensor,
    alignment_coef: float,
    diversity_coef: float,
    *,
    use_whitening: bool = False,
) -> GroupRewards:
    """``2 a cos(g_j, ref) - 2 d mean_{j' != j} g_j . g_j'`` for the (n, D) ``generated`` features of one
    prompt and its (D,) ``reference``; the diversity term is 0 at n = 1.
    ``cfm_loss = |mean_j g_j - ref|^2``."""
    generated, reference = generated.float(), reference.float()
    if use_whitening:
        generated, reference = whiten(generated, reference)
    n = generated.shape[0]
    alignment = F.cosine_similarity(generated, reference[None], dim=-1)
    if n > 1:
        dots = generated @ generated.T
        diversity = (dots.sum(1) - dots.diagonal()) / (n - 1)
    else:
        diversity = torch.zeros_like(alignment)
    rewards = 2 * alignment_coef * alignment - 2 * diversity_coef * diversity
    cfm_loss = float((generated.mean(0) - reference).pow(2).sum())
    return GroupRewards(rewards, alignment, diversity, cfm_loss)


def conversation_rewards(
    generated: list[torch.Tensor],
    reference: torch.Tensor,
    alignment_coef: float,
    diversity_coef: float,
    *,
    use_whitening: bool = False,
) -> GroupRewards:
    """Multi-turn: ``group_rewards`` of each sample's (K_j, D) turn features averaged over its turns,
    against the (K, D) reference turn features averaged over the reference's turns."""
    means = torch.stack([turns.float().mean(0) for turns in generated])
    return group_rewards(
        means, reference.float().mean(0), alignment_coef, diversity_coef, use_whitening=use_whitening
    )


def advantages(rewards: torch.Tensor, estimator: str) -> torch.Tensor:
    """Advantages of (groups, n) rewards: ``rloo`` r_j - mean(r_-j); ``group_norm`` (r - mean) / (std + 1e-6)
    (std with n - 1); ``reinforce`` r. At n = 1 always ``reinforce``."""
    n = rewards.shape[-1]
    if n == 1 or estimator == "reinforce":
        return rewards
    if estimator == "rloo":
        return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (n - 1)
    if estimator == "group_norm":
        return (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-6)
    raise ValueError(f"unknown advantage_estimator {estimator!r}")
