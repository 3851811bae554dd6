"""Autograd Functions over the Triton kernels, with the pure-torch reference as CPU fallback.

``scatter_linear`` computes, for every (token, expert) assignment, ``y = x W_e^T + s (x A_e^T) B_e^T``.
Backward: dX through the base weight and the LoRA factors, dA and dB per expert from the
low-rank intermediates (``B A`` is never materialised), dW only when the weight trains.
"""

from __future__ import annotations

import os

import torch

from ftcore_scattermoe import reference
from ftcore_scattermoe.routing import Routing

LoRA = tuple[torch.Tensor, torch.Tensor, float]  # A [E, R, in], B [E, out, R], scaling


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1``; else the torch reference."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def scatter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: Routing,
    *,
    x_grouped: bool,
    y_grouped: bool,
    lora: LoRA | None = None,
) -> torch.Tensor:
    """Expert linear layer over routed rows; see ``reference.scatter_linear`` for the layouts."""
    if not use_triton(x):
        return reference.scatter_linear(
            x, weight, routing, x_grouped=x_grouped, y_grouped=y_grouped, lora=lora
        )
    lora_a, lora_b, scaling = lora if lora is not None else (None, None, 0.0)
    return _ScatterLinear.apply(x, weight, lora_a, lora_b, scaling, routing, x_grouped, y_grouped)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``h = [gate | up]`` ([S, 2I] -> [S, I]); fused kernel where Triton runs."""
    if not use_triton(h):
        return reference.swiglu(h)
    return _SwiGLU.apply(h)


class _ScatterLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling, routing, x_grouped, y_grouped):
        from ftcore_scattermoe import kernels

        fan_out = 1 if x_grouped else routing.k
        lora_in = None
        if lora_a is not None:
            lora_in = kernels.scatter2scatter(
                x, lora_a, routing, x_grouped=x_grouped, y_grouped=True, fan_out=fan_out
            )  # x A_e^T, [S, R] grouped
        y = kernels.scatter2scatter(
            x, weight, routing, x_grouped=x_grouped, y_grouped=y_grouped, fan_out=fan_out,
            lora_in=lora_in, lora_b=lora_b, scaling=scaling,
        )  # fmt: skip
        needs_x = weight.requires_grad or (lora_a is not None and lora_a.requires_grad)
        ctx.save_for_backward(x if needs_x else None, weight, lora_a, lora_b, lora_in)
        ctx.routing, ctx.scaling, ctx.x_grouped, ctx.y_grouped = routing, scaling, x_grouped, y_grouped
        ctx.x_rows = x.shape[0]
        return y

    @staticmethod
    def backward(ctx, dy):
        from ftcore_scattermoe import kernels

        x, weight, lora_a, lora_b, lora_in = ctx.saved_tensors
        routing, scaling, y_grouped = ctx.routing, ctx.scaling, ctx.y_grouped
        x_fan_out = 1 if ctx.x_grouped else routing.k
        rows = dict(routing=routing, x_grouped=y_grouped, fan_out=1)  # dy is laid out like y
        dy_b = None
        if lora_a is not None:
            dy_b = kernels.scatter2scatter(
                dy, lora_b.transpose(1, 2), y_grouped=True, **rows
            )  # dy B_e, [S, R]
        dx = dw = da = db = None
        if ctx.needs_input_grad[0]:
            lora = (
                dict(lora_in=dy_b, lora_b=lora_a.transpose(1, 2), scaling=scaling)
                if lora_a is not None
                else {}
            )
            dx = kernels.scatter2scatter(dy, weight.transpose(1, 2), y_grouped=ctx.x_grouped, **rows, **lora)
            if not ctx.x_grouped and routing.k > 1:
                dx = dx.view(ctx.x_rows, routing.k, -1).sum(1)
        grad = dict(routing=routing, p_grouped=y_grouped, q_grouped=ctx.x_grouped, q_fan_out=x_fan_out)
        if ctx.needs_input_grad[1]:
            dw = kernels.grouped_weight_grad(dy, x, out=torch.empty_like(weight), **grad)
        if ctx.needs_input_grad[2]:
            da = kernels.grouped_weight_grad(
                dy_b, x, routing, torch.empty_like(lora_a), p_grouped=True, q_grouped=ctx.x_grouped,
                q_fan_out=x_fan_out, scaling=scaling,
            )  # fmt: skip
        if ctx.needs_input_grad[3]:
            db = kernels.grouped_weight_grad(
                dy,
                lora_in,
                routing,
                torch.empty_like(lora_b),
                p_grouped=y_grouped,
                q_grouped=True,
                scaling=scaling,
            )
        return dx, dw, da, db, None, None, None, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        from ftcore_scattermoe import kernels

        h = h.contiguous()
        ctx.save_for_backward(h)
        return kernels.swiglu_forward(h)

    @staticmethod
    def backward(ctx, dout):
        from ftcore_scattermoe import kernels

        (h,) = ctx.saved_tensors
        return kernels.swiglu_backward(h, dout.contiguous())
