"""Triton kernels: scatter-to-scatter grouped GEMM with a LoRA epilogue, grouped weight
gradients, and the fused SwiGLU gate.

Weights are read through their strides in the layout transformers stores them (``[E, out, in]``,
or ``[E, in, out]`` passed as a transposed view), so nothing is copied or transposed. LoRA
factors are per-expert views ``A [E, R, in]`` and ``B [E, out, R]`` with any strides (peft keeps
them as ``[R*E, in]`` and ``[out, R*E]``). Autotuning covers a pruned set of tile shapes, is
cached on disk, and is skipped under ``TRITON_INTERPRET=1`` (the CPU test mode).
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from ftcore_scattermoe.routing import Routing

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TILES = [  # (BLOCK_N, BLOCK_K, warps, stages); every one fits 128 rows of fp32 in H100 shared memory
    ({"BLOCK_N": 128, "BLOCK_K": 64}, 8, 3),
    ({"BLOCK_N": 256, "BLOCK_K": 64}, 8, 3),
    ({"BLOCK_N": 128, "BLOCK_K": 32}, 4, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 64}, 4, 4),
]
# Tile order: GROUP_M row tiles sweep all their column tiles before the next group starts, so the
# gathered input rows and the expert's weight slice are read from L2, not HBM, when many tokens
# or wide experts make them outgrow it; ALL_ROWS sweeps every row tile per column (the best
# order when everything fits in L2). The autotuner picks per shape.
ALL_ROWS = 1 << 20
GROUP_SIZES = (8, ALL_ROWS)
GEMM_CONFIGS = [
    triton.Config({**tile, "GROUP_M": group}, num_warps=warps, num_stages=stages)
    for tile, warps, stages in TILES
    for group in GROUP_SIZES
]
SMALL_N = 64  # outputs this narrow (the LoRA rank) use one fixed tile instead of autotuning


def _prune(configs, named_args, **kwargs):
    """Drop tiles wider than the problem or beyond this GPU's shared memory; keep at least one."""
    n, k = named_args["N"], named_args["K"]
    itemsize = named_args["x_ptr"].element_size()
    shared = triton.runtime.driver.active.utils.get_device_properties(named_args["x_ptr"].device.index)[
        "max_shared_mem"
    ]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(n))
        and c.kwargs["BLOCK_K"] <= max(32, triton.next_power_of_2(k))
        and (128 + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize * c.num_stages <= shared
    ]
    return kept or configs[-1:]


def _autotuned(fn):
    """``fn`` autotuned over ``GEMM_CONFIGS``, keyed on the problem shape (and dtypes), results cached on disk."""
    if INTERPRET:
        return fn
    options = (
        {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    )
    return triton.autotune(
        GEMM_CONFIGS,
        key=["N", "K", "BLOCK_M", "X_GROUPED", "Y_GROUPED", "HAS_LORA"],
        prune_configs_by={"early_config_prune": _prune},
        **options,
    )(fn)


@triton.jit
def _scatter2scatter_body(
    x_ptr, stride_xm, stride_xk,
    w_ptr, stride_we, stride_wn, stride_wk,
    y_ptr, stride_ym, stride_yn,
    l_ptr, stride_lm, stride_lr,
    b_ptr, stride_be, stride_bn, stride_br,
    scaling, scattered_idxs_ptr, block_expert_ptr, block_start_ptr, expert_ends_ptr,
    N, K, R, NUM_M,
    FAN_OUT: tl.constexpr, X_GROUPED: tl.constexpr, Y_GROUPED: tl.constexpr, HAS_LORA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # one program per (row tile, column tile); GROUP_M row tiles sweep their column tiles together
    pid = tl.program_id(0)
    group_programs = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group_programs) * GROUP_M
    group_rows = tl.minimum(NUM_M - first_m, GROUP_M)
    pid_m = first_m + (pid % group_programs) % group_rows
    pid_n = (pid % group_programs) // group_rows
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    expert = expert.to(tl.int64)
    rows = tl.load(block_start_ptr + pid_m) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(expert_ends_ptr + expert)
    if X_GROUPED:
        x_rows = rows.to(tl.int64)
    else:
        x_rows = tl.load(scattered_idxs_ptr + rows, mask=row_mask, other=0).to(tl.int64) // FAN_OUT
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k_block * BLOCK_K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_LORA:
        # y += scaling * (x A_e^T) B_e^T, with x A_e^T precomputed per grouped row in l.
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        lora_in = tl.load(
            l_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr,
            mask=row_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        lora_b = tl.load(
            b_ptr + expert * stride_be + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc += tl.dot(lora_in, lora_b, input_precision=PRECISION) * scaling
    if Y_GROUPED:
        y_rows = rows.to(tl.int64)
    else:
        y_rows = tl.load(scattered_idxs_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    y_ptrs = y_ptr + y_rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


_scatter2scatter_tuned = _autotuned(_scatter2scatter_body)


@triton.jit
def _grouped_weight_grad(
    p_ptr, stride_pm, stride_pn,
    q_ptr, stride_qm, stride_qk,
    o_ptr, stride_oe, stride_on, stride_ok,
    scattered_idxs_ptr, expert_ends_ptr, scaling, N, K,
    P_GROUPED: tl.constexpr, P_FAN_OUT: tl.constexpr, Q_GROUPED: tl.constexpr, Q_FAN_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[e] = scaling * sum over the rows of expert e of P[row]^T Q[row]  ([N, K] per expert)."""
    expert = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    k_mask = offs_k < K
    start = tl.load(expert_ends_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(expert_ends_ptr + expert)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m in range(start, end, BLOCK_M):
        rows = m + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        if P_GROUPED:
            p_rows = rows.to(tl.int64)
        else:
            p_rows = tl.load(scattered_idxs_ptr + rows, mask=row_mask, other=0).to(tl.int64) // P_FAN_OUT
        if Q_GROUPED:
            q_rows = rows.to(tl.int64)
        else:
            q_rows = tl.load(scattered_idxs_ptr + rows, mask=row_mask, other=0).to(tl.int64) // Q_FAN_OUT
        p = tl.load(
            p_ptr + p_rows[:, None] * stride_pm + offs_n[None, :] * stride_pn,
            mask=row_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qm + offs_k[None, :] * stride_qk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(p), q, acc, input_precision=PRECISION)
    o_ptrs = (
        o_ptr + expert.to(tl.int64) * stride_oe + offs_n[:, None] * stride_on + offs_k[None, :] * stride_ok
    )
    tl.store(o_ptrs, (acc * scaling).to(o_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def _swiglu_fwd(h_ptr, out_ptr, stride_h, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(h_ptr, dout_ptr, dh_ptr, stride_h, stride_d, stride_dh, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + row * stride_h + inter + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * gate * sig
    tl.store(dh_ptr + row * stride_dh + cols, dgate.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * stride_dh + inter + cols, dup.to(dh_ptr.dtype.element_ty), mask=mask)


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def block_m_for(routing: Routing) -> int:
    """Rows per tile: 128 when experts get many rows each, else 64 (less padding)."""
    return 128 if routing.num_rows >= 256 * routing.num_experts else 64


def scatter2scatter(
    x: torch.Tensor,
    weight: torch.Tensor,
    routing: Routing,
    *,
    x_grouped: bool,
    y_grouped: bool,
    fan_out: int = 1,
    lora_in: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 0.0,
) -> torch.Tensor:
    """y_row = x_row W_e^T (+ scaling * lora_in_row lora_b_e^T) for every grouped row.

    ``weight`` is ``[E, N, K]`` (any strides). ``x`` rows are grouped rows (``x_grouped``) or
    looked up as ``scattered_idxs // fan_out``; ``y`` is ``[S, N]`` in grouped order
    (``y_grouped``) or in scattered (token * k + slot) order. ``lora_in`` is ``[S, R]`` in
    grouped order and ``lora_b`` is ``[E, N, R]``.
    """
    num_experts, n, k = weight.shape
    y = x.new_empty(routing.num_rows, n)
    has_lora = lora_in is not None
    r = lora_in.shape[1] if has_lora else 0
    lora_in = lora_in if has_lora else x
    lora_b = lora_b if has_lora else weight
    block_m = block_m_for(routing)
    block_expert, block_start = routing.blocks(block_m)
    args = [
        x, x.stride(0), x.stride(1),
        weight, weight.stride(0), weight.stride(1), weight.stride(2),
        y, y.stride(0), y.stride(1),
        lora_in, lora_in.stride(0), lora_in.stride(1),
        lora_b, lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        float(scaling), routing.scattered_idxs, block_expert, block_start, routing.expert_ends,
        n, k, r, block_expert.numel(),
    ]  # fmt: skip
    meta = dict(
        FAN_OUT=fan_out, X_GROUPED=x_grouped, Y_GROUPED=y_grouped, HAS_LORA=has_lora, BLOCK_M=block_m,
        BLOCK_R=max(16, triton.next_power_of_2(r)), PRECISION=_precision(x.dtype),
    )  # fmt: skip
    grid = lambda meta: (block_expert.numel() * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    if INTERPRET:
        _scatter2scatter_body[grid](*args, **meta, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)
    elif n > SMALL_N and routing.autotune:  # off: GEMM_CONFIGS[0]
        _scatter2scatter_tuned[grid](*args, **meta)
    elif n > SMALL_N:
        config = GEMM_CONFIGS[0]
        _scatter2scatter_body[grid](
            *args, **meta, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    else:
        block_n = max(16, triton.next_power_of_2(n))
        _scatter2scatter_body[grid](
            *args, **meta, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=ALL_ROWS, num_warps=4, num_stages=3
        )
    return y


def grouped_weight_grad(
    p: torch.Tensor,
    q: torch.Tensor,
    routing: Routing,
    out: torch.Tensor,
    *,
    p_grouped: bool,
    q_grouped: bool,
    p_fan_out: int = 1,
    q_fan_out: int = 1,
    scaling: float = 1.0,
) -> torch.Tensor:
    """Fill ``out`` [E, N, K] with scaling * P_e^T Q_e (rows of P, Q addressed like ``scatter2scatter``)."""
    num_experts, n, k = out.shape
    block_n = 16 if n <= 16 else 32 if n <= 32 else 64 if n <= 64 else 128
    block_k = 16 if k <= 16 else 32 if k <= 32 else 64 if k <= 64 else 128
    if INTERPRET:
        block_n, block_k = min(block_n, 32), min(block_k, 32)
    grid = (num_experts, triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _grouped_weight_grad[grid](
        p, p.stride(0), p.stride(1),
        q, q.stride(0), q.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        routing.scattered_idxs, routing.expert_ends, float(scaling), n, k,
        P_GROUPED=p_grouped, P_FAN_OUT=p_fan_out, Q_GROUPED=q_grouped, Q_FAN_OUT=q_fan_out,
        BLOCK_M=32, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(p.dtype),
        **({} if INTERPRET else {"num_warps": 8 if block_n * block_k >= 128 * 64 else 4, "num_stages": 3}),
    )  # fmt: skip
    return out


def _swiglu_grid(rows: int, inter: int) -> tuple[tuple[int, int], int]:
    block = min(1024, triton.next_power_of_2(inter))
    return (rows, triton.cdiv(inter, block)), block


def swiglu_forward(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for ``h = [gate | up]`` of shape [S, 2I]."""
    rows, inter = h.shape[0], h.shape[1] // 2
    out = h.new_empty(rows, inter)
    grid, block = _swiglu_grid(rows, inter)
    _swiglu_fwd[grid](h, out, h.stride(0), out.stride(0), inter, BLOCK=block)
    return out


def swiglu_backward(h: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    rows, inter = h.shape[0], h.shape[1] // 2
    dh = torch.empty_like(h)
    grid, block = _swiglu_grid(rows, inter)
    _swiglu_bwd[grid](h, dout, dh, h.stride(0), dout.stride(0), dh.stride(0), inter, BLOCK=block)
    return dh
