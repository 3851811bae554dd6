"""The Triton kernels against the pure-torch reference: forward and backward (dX, dW, dA, dB).

On a CUDA machine these run directly in fp32 and bf16. On CPU the kernels run under
``TRITON_INTERPRET=1``, which must be set before triton loads: ``test_kernels_under_interpreter``
reruns this module in a subprocess with it set, so the setting never leaks into other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ftcore_scattermoe import ops, reference
from ftcore_scattermoe.routing import flatten_sort_count
from ftcore_scattermoe.testing import compare_with_eager

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16] if CUDA else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
kernels_run = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="kernels run on CUDA, or on CPU via test_kernels_under_interpreter"
)


def test_kernels_under_interpreter():
    if CUDA or INTERPRETED:
        pytest.skip("the kernels run directly in this process")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--import-mode=importlib",
            __file__,
        ]
        + ["-k", "not test_kernels_under_interpreter"],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]


def assert_close(actual, expected, dtype, what=""):
    """Max error relative to the largest reference magnitude (bf16 rounds at ~4e-3 per value)."""
    error = (actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)
    assert error < TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


def routed_problem(dtype, tokens=40, k=2, experts=5, d_in=48, d_out=40, rank=4, empty_expert=3, seed=0):
    """Random x, expert weights [E, out, in], peft-layout LoRA factors and a top-k routing.

    Expert ``empty_expert`` gets no tokens (its gradients must be zero). Sizes are not multiples
    of the tile sizes, so the masks are exercised.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(DEVICE, dtype).requires_grad_()

    choices = [e for e in range(experts) if e != empty_expert]
    top_k = torch.stack(
        [torch.tensor(choices)[torch.randperm(len(choices), generator=generator)[:k]] for _ in range(tokens)]
    )
    x = randn(tokens, d_in)
    weight = randn(experts, d_out, d_in, scale=d_in**-0.5)
    lora_a = randn(experts * rank, d_in, scale=d_in**-0.5)  # peft: [E*R, in], expert-major
    lora_b = randn(d_out, rank * experts, scale=rank**-0.5)  # peft: [out, R*E], rank-major
    lora = (lora_a.view(experts, rank, d_in), lora_b.view(d_out, rank, experts).permute(2, 0, 1), 2.0)
    return x, weight, (lora_a, lora_b), lora, flatten_sort_count(top_k.to(DEVICE), experts)


def test_routing_tiles_cover_each_row_once():
    top_k = torch.tensor([[0, 2], [2, 1], [0, 2], [2, 0], [1, 2]])
    routing = flatten_sort_count(top_k, num_experts=4)
    assert routing.expert_ends.tolist() == [3, 5, 10, 10]
    assert routing.expert_idxs.tolist() == sorted(top_k.flatten().tolist())
    assert torch.equal(top_k.flatten()[routing.scattered_idxs], routing.expert_idxs)
    expert, first = routing.blocks(block_m=2)
    covered = []
    for e, start in zip(expert.tolist(), first.tolist(), strict=True):
        if e >= 0:
            rows = [r for r in range(start, start + 2) if r < routing.expert_ends[e]]
            assert all(routing.expert_idxs[r] == e for r in rows)
            covered += rows
    assert sorted(covered) == list(range(10))


SHAPES = {"small": dict(tokens=40, experts=5, d_in=48, d_out=40, rank=4)}
if CUDA:  # wide enough for the autotuned tiles; 600 rows per expert -> 128-row tiles
    SHAPES["wide"] = dict(tokens=1200, experts=4, d_in=192, d_out=160, rank=16, empty_expert=2)


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize(
    "x_grouped, y_grouped", [(False, True), (True, False), (True, True)], ids=["up", "down", "grouped"]
)
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_linear_matches_reference(dtype, with_lora, x_grouped, y_grouped, shape):
    x, weight, (lora_a, lora_b), lora, routing = routed_problem(dtype, **SHAPES[shape])
    if x_grouped:
        x = x.detach().repeat_interleave(routing.k, 0)[: routing.num_rows].requires_grad_()
    lora = lora if with_lora else None
    y = ops.scatter_linear(x, weight, routing, x_grouped=x_grouped, y_grouped=y_grouped, lora=lora)
    leaves = [x, weight] + ([lora_a, lora_b] if with_lora else [])
    upcast = [t.detach().float().requires_grad_() for t in leaves]
    ref_lora = None
    if with_lora:
        e, r = weight.shape[0], lora[0].shape[1]
        ref_lora = (upcast[2].view(e, r, -1), upcast[3].view(upcast[3].shape[0], r, e).permute(2, 0, 1), 2.0)
    expected = reference.scatter_linear(
        upcast[0], upcast[1], routing, x_grouped=x_grouped, y_grouped=y_grouped, lora=ref_lora
    )
    assert y.shape == expected.shape and y.dtype == dtype
    assert_close(y, expected, dtype, "y")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, leaves, grad_y)
    expected_grads = torch.autograd.grad(expected, upcast, grad_y.float())
    for name, grad, expected_grad in zip(["dX", "dW", "dA", "dB"], grads, expected_grads, strict=False):
        assert grad.shape == expected_grad.shape, name
        assert_close(grad, expected_grad, dtype, name)
    if with_lora:  # the expert without tokens gets exactly zero LoRA gradients
        experts, rank, empty = weight.shape[0], lora[0].shape[1], SHAPES[shape].get("empty_expert", 3)
        assert not grads[2].view(experts, rank, -1)[empty].any()
        assert not grads[3].view(-1, rank, experts)[:, :, empty].any()


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_weight_skips_weight_grad(dtype):
    x, weight, (lora_a, lora_b), lora, routing = routed_problem(dtype)
    weight.requires_grad_(False)
    y = ops.scatter_linear(x, weight, routing, x_grouped=False, y_grouped=True, lora=lora)
    y.sum().backward()
    assert weight.grad is None and lora_a.grad is not None and lora_b.grad is not None and x.grad is not None


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_matches_reference(dtype):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(37, 2 * 24, generator=generator).to(DEVICE, dtype).requires_grad_()
    out = ops.swiglu(h)
    h_ref = h.detach().float().requires_grad_()
    expected = reference.swiglu(h_ref)
    assert_close(out, expected, dtype, "swiglu")
    grad_out = torch.randn(out.shape, generator=generator).to(DEVICE, dtype)
    (grad,) = torch.autograd.grad(out, h, grad_out)
    (expected_grad,) = torch.autograd.grad(expected, h_ref, grad_out.float())
    assert_close(grad, expected_grad, dtype, "dswiglu")


@kernels_run
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("architecture", ["qwen3_moe", "mixtral", "gpt_oss"])
@pytest.mark.parametrize("with_lora", [False, True], ids=["base", "lora"])
def test_tiny_model_matches_eager(architecture, with_lora, dtype):
    compare_with_eager(architecture, with_lora, DEVICE, dtype, TOLERANCE[dtype])
