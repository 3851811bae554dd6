"""Triton kernels of ``ftcore_grpo.logprobs``: one program per row of logits, streaming over the
vocabulary in blocks with an online max / sum-exp, so nothing of size rows x vocab is written
except the gradient. Logits are read through their strides ([B, L, V], any layout); statistics
are kept in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK = 128 if INTERPRET else 4096
"""Vocabulary entries per loop iteration (small under the CPU interpreter, where it is slow)."""
PER_BATCH = ["L", "stride_xb", "stride_ib", "stride_gb"]
"""Integer arguments that change with every packed batch's length: not specialised on (Triton
would compile another variant the first time one is a multiple of 16, in the middle of a run)."""


@triton.jit
def _row_pointer(ptr, row, L, stride_b, stride_l):
    return ptr + (row // L).to(tl.int64) * stride_b + (row % L).to(tl.int64) * stride_l


@triton.jit(do_not_specialize=PER_BATCH)
def _stats_kernel(
    x_ptr, stride_xb, stride_xl, stride_xv,
    index_ptr, stride_ib, stride_il,
    lse_ptr, mean_ptr, picked_ptr,
    L, V,
    WITH_INDEX: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Per row: log-sum-exp, the softmax-weighted mean logit (for the entropy), the indexed logit."""
    row = tl.program_id(0)
    x_row = _row_pointer(x_ptr, row, L, stride_xb, stride_xl)
    offsets = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        x = tl.load(x_row + cols.to(tl.int64) * stride_xv, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        scale = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        s = s * scale + tl.sum(e, 0)
        t = t * scale + tl.sum(e * tl.where(cols < V, x, 0.0), 0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(s))
    tl.store(mean_ptr + row, t / s)
    if WITH_INDEX:
        i_row = _row_pointer(index_ptr, row, L, stride_ib, stride_il)
        token = tl.load(i_row).to(tl.int64)
        tl.store(picked_ptr + row, tl.load(x_row + token * stride_xv).to(tl.float32))


@triton.jit(do_not_specialize=PER_BATCH)
def _grad_kernel(
    x_ptr, stride_xb, stride_xl, stride_xv,
    index_ptr, stride_ib, stride_il,
    grad_out_ptr, stride_gb, stride_gl,
    lse_ptr, mean_ptr,
    grad_x_ptr,
    L, V,
    ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Per row: g * (onehot(index) - softmax) for the log-prob; g * softmax * (mean - x) for the entropy."""
    row = tl.program_id(0)
    x_row = _row_pointer(x_ptr, row, L, stride_xb, stride_xl)
    g = tl.load(_row_pointer(grad_out_ptr, row, L, stride_gb, stride_gl)).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    if ENTROPY:
        mean = tl.load(mean_ptr + row)
    else:
        token = tl.load(_row_pointer(index_ptr, row, L, stride_ib, stride_il)).to(tl.int64)
    out_row = grad_x_ptr + row.to(tl.int64) * V
    offsets = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offsets
        x = tl.load(x_row + cols.to(tl.int64) * stride_xv, mask=cols < V, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        if ENTROPY:
            grad = g * p * (mean - x)
        else:
            grad = g * (tl.where(cols == token, 1.0, 0.0) - p)
        tl.store(out_row + cols, grad.to(grad_x_ptr.dtype.element_ty), mask=cols < V)


def row_stats(logits: torch.Tensor, index: torch.Tensor | None = None):
    """(log-sum-exp, softmax-mean logit, index logit or None), each float32 of shape logits.shape[:-1]."""
    x = logits if logits.dim() == 3 else logits[None]
    B, L, V = x.shape
    rows = B * L
    lse = torch.empty(rows, dtype=torch.float32, device=x.device)
    mean = torch.empty_like(lse)
    picked = torch.empty_like(lse) if index is not None else lse
    i = (index if index.dim() == 2 else index[None]) if index is not None else x
    _stats_kernel[(rows,)](
        x, x.stride(0), x.stride(1), x.stride(2),
        i, i.stride(0), i.stride(1),
        lse, mean, picked,
        L, V,
        WITH_INDEX=index is not None, BLOCK_V=BLOCK, num_warps=8,
    )  # fmt: skip
    shape = logits.shape[:-1]
    return lse.view(shape), mean.view(shape), (picked.view(shape) if index is not None else None)


def row_grad(logits, index, grad_output, lse, mean, *, entropy: bool) -> torch.Tensor:
    """The gradient with respect to ``logits`` (contiguous, in the logits' dtype)."""
    x = logits if logits.dim() == 3 else logits[None]
    B, L, V = x.shape
    g = grad_output if grad_output.dim() == 2 else grad_output[None]
    i = (index if index.dim() == 2 else index[None]) if index is not None else g
    grad = torch.empty((B, L, V), dtype=logits.dtype, device=logits.device)
    _grad_kernel[(B * L,)](
        x, x.stride(0), x.stride(1), x.stride(2),
        i, i.stride(0), i.stride(1),
        g, g.stride(0), g.stride(1),
        lse.reshape(-1), mean.reshape(-1),
        grad,
        L, V,
        ENTROPY=entropy, BLOCK_V=BLOCK, num_warps=8,
    )  # fmt: skip
    return grad.view(logits.shape)
