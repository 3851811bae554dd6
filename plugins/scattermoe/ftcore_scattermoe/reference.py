"""Pure-torch reference of the kernels' math: the CPU fallback and the tests' ground truth.

Autograd differentiates it, so its backward (dX, dW, dA, dB) is the reference for the kernels'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftcore_scattermoe.routing import Routing


def scatter_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: Routing,
    *,
    x_grouped: bool,
    y_grouped: bool,
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """Per expert e: y = x W_e^T + s (x A_e^T) B_e^T, with ``weight`` [E, N, K], A [E, R, K], B [E, N, R].

    ``x`` is [S, K] in grouped order or [T, K] per token (each token read by its k rows); ``y`` is
    [S, N] in grouped order or in scattered (token * k + slot) order.
    """
    grouped_x = x if x_grouped else x[routing.scattered_idxs // routing.k]
    outputs, start = [], 0
    for expert, end in enumerate(routing.expert_ends.tolist()):
        rows = grouped_x[start:end]
        out = rows @ weight[expert].T
        if lora is not None:
            lora_a, lora_b, scaling = lora
            out = out + scaling * ((rows @ lora_a[expert].T) @ lora_b[expert].T)
        outputs.append(out)
        start = end
    grouped_y = torch.cat(outputs)
    if y_grouped:
        return grouped_y
    return torch.empty_like(grouped_y).index_copy(0, routing.scattered_idxs, grouped_y)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``h = [gate | up]``."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
