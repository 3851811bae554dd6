"""Per-token log-probs and entropy from logits without a float32 log-softmax over the vocabulary.

``selective_log_softmax(logits, index)`` = log_softmax(logits)[..., index] and
``entropy_from_logits(logits)`` = -sum p log p, both differentiable. On CUDA tensors (or under
``TRITON_INTERPRET=1``) they run the Triton kernels of ``ftcore_grpo.triton_logprobs``: logits
of any strides (a transposed or sliced view is read in place), bf16 or fp32, float32 statistics,
only the gradient written at vocabulary size. Elsewhere, or without Triton, the plain-torch
``*_reference`` functions run, ``chunk_size`` rows at a time to bound the float32 copy.
"""

from __future__ import annotations

import os

import torch


def selective_log_softmax_reference(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 1024):
    """log_softmax(logits.float())[..., index], ``chunk_size`` rows at a time, in float32."""
    rows, tokens = logits.reshape(-1, logits.shape[-1]), index.reshape(-1)
    out = [
        rows[i : i + chunk_size].float().log_softmax(-1).gather(-1, tokens[i : i + chunk_size, None])[:, 0]
        for i in range(0, rows.shape[0], chunk_size)
    ]
    return torch.cat(out).view(index.shape)


def entropy_from_logits_reference(logits: torch.Tensor, chunk_size: int = 1024):
    """-sum(p * log p) over the last dimension, ``chunk_size`` rows at a time, in float32."""
    rows = logits.reshape(-1, logits.shape[-1])
    out = []
    for i in range(0, rows.shape[0], chunk_size):
        logp = rows[i : i + chunk_size].float().log_softmax(-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


def _use_triton(tensor: torch.Tensor) -> bool:
    if not (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or tensor.dim() not in (2, 3):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index):
        from ftcore_grpo.triton_logprobs import row_stats

        lse, mean, picked = row_stats(logits, index)
        ctx.save_for_backward(logits, index, lse, mean)
        return picked - lse

    @staticmethod
    def backward(ctx, grad_output):
        from ftcore_grpo.triton_logprobs import row_grad

        logits, index, lse, mean = ctx.saved_tensors
        return row_grad(logits, index, grad_output, lse, mean, entropy=False), None


class _Entropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        from ftcore_grpo.triton_logprobs import row_stats

        lse, mean, _ = row_stats(logits)
        ctx.save_for_backward(logits, lse, mean)
        return lse - mean  # H = log Z - sum p x

    @staticmethod
    def backward(ctx, grad_output):
        from ftcore_grpo.triton_logprobs import row_grad

        logits, lse, mean = ctx.saved_tensors
        return row_grad(logits, None, grad_output, lse, mean, entropy=True)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """log_softmax(logits)[..., index] in float32: logits [B, L, V] or [N, V], index [B, L] or [N]."""
    if _use_triton(logits):
        return _SelectiveLogSoftmax.apply(logits, index)
    return selective_log_softmax_reference(logits, index, chunk_size)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """The entropy of softmax(logits) per row, in float32: logits [B, L, V] or [N, V]."""
    if _use_triton(logits):
        return _Entropy.apply(logits)
    return entropy_from_logits_reference(logits, chunk_size)
