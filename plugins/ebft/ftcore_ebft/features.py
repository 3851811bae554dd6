"""Features: hidden states of the feature network at fractions of depth, normalised, pooled, whitened.

The feature network is the policy with its adapter disabled (LoRA: the adapter is never merged
into the base) or, under full fine-tuning, a frozen copy of the starting policy.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

QUARTERS = (0.25, 0.5, 0.75)


def layer_indices(num_layers: int, fractions: list[float]) -> list[int]:
    """Indices into ``hidden_states`` (0 = the embeddings) of layers round(f x L)."""
    return [min(num_layers, max(1, round(f * num_layers))) for f in fractions]


def select(hidden_states, indices: list[int]) -> torch.Tensor:
    """The chosen layers, each L2-normalised per token, concatenated on the feature axis."""
    return torch.cat([F.normalize(hidden_states[i].float(), dim=-1) for i in indices], dim=-1)


def pool(states: torch.Tensor, ends: torch.Tensor, starts: torch.Tensor, method: str) -> torch.Tensor:
    """(B, T, D) states -> (B, D) features (B, 3D for ``concat``).

    Row b holds tokens ``[0, ends[b])``, its completion ``[starts[b], ends[b])``.
    """
    rows = torch.arange(states.shape[0], device=states.device)
    positions = torch.arange(states.shape[1], device=states.device)[None]
    if method == "last_token":
        return states[rows, ends - 1]
    if method in ("mean_pooling", "completion_mean"):
        first = starts[:, None] if method == "completion_mean" else 0
        keep = ((positions >= first) & (positions < ends[:, None])).to(states.dtype)
        return (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
    if method == "concat":
        length = (ends - starts - 1).clamp(min=0)
        picks = [states[rows, starts + (q * length).long()] for q in QUARTERS]
        return torch.cat(picks, dim=-1)
    raise ValueError(f"unknown embed_method {method!r}")


def whiten(generated: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply W = U diag(1/S) U^T, from the SVD of the generated features (D x n), to both sides."""
    u, s, _ = torch.linalg.svd(generated.T.double(), full_matrices=False)
    keep = s > s.max() * 1e-6
    u, s = u[:, keep], s[keep]

    def apply(x):
        return (((x.double() @ u) / s) @ u.T).to(generated.dtype)

    return apply(generated), apply(reference)


class FeatureNetwork:
    """Hidden states of the frozen feature model for token batches.

    Under an adapter it is the policy itself with the adapter disabled; otherwise a frozen copy
    of the policy as given, on ``device``, or else wherever the policy is when features are
    computed (the trainer moves the policy to its GPU after the copy is made).
    """

    def __init__(self, policy, fractions: list[float], device: str | None = None):
        from peft import PeftModel

        self.shared = isinstance(policy, PeftModel)
        self.policy = policy if not (self.shared or device) else None  # the copy follows its device
        if self.shared:
            self.model = policy
        else:
            self.model = copy.deepcopy(policy).requires_grad_(False).eval()
            if device:
                self.model.to(device)
        config = (
            self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else None
        )
        self.indices = layer_indices((config or self.model.config).num_hidden_layers, fractions)

    @property
    def device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def states(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        """(B, T, len(layers) x hidden) normalised, concatenated states."""
        if self.policy is not None and next(self.policy.parameters()).device != self.device:
            self.model.to(next(self.policy.parameters()).device)
        device = self.device
        kwargs = {"attention_mask": attention_mask.to(device) if attention_mask is not None else None}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(device)
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if self.shared else contextlib.nullcontext():
                out = self.model(
                    input_ids=input_ids.to(device), output_hidden_states=True, use_cache=False, **kwargs
                )
        finally:
            self.model.train(training)
        return select(out.hidden_states, self.indices)

    def features(
        self, sequences: list[list[int]], spans: list[list[tuple[int, int]]], method: str, pad_id: int
    ) -> list[torch.Tensor]:
        """Pooled features of token sequences (right-padded into one batch): for sequence i a (K_i, D) tensor,
        one row per ``(start, end)`` of ``spans[i]`` (a completion or a turn: tokens [start, end) after [0, start))."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        states = self.states(ids, mask)
        flat = [(row, start, end) for row, pairs in enumerate(spans) for start, end in pairs]
        rows, starts, ends = (
            torch.tensor(column, device=states.device) for column in zip(*flat, strict=True)
        )
        pooled = pool(states[rows], ends, starts, method)
        return list(pooled.split([len(pairs) for pairs in spans]))
