"""The log-prob and entropy kernels against the plain-torch reference: values and gradients, bf16
and fp32, strided views, a vocabulary that is not a multiple of the block.

On CPU the Triton kernels run under ``TRITON_INTERPRET=1``, which must be set before triton
loads: ``test_kernels_under_interpreter`` reruns this module in a subprocess with it set. On a
CUDA machine the ``gpu`` tests also run at the real vocabulary size.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from ftcore_grpo.logprobs import (
    entropy_from_logits,
    entropy_from_logits_reference,
    selective_log_softmax,
    selective_log_softmax_reference,
)

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
"""Relative to the largest reference value; a bf16 gradient rounds at ~4e-3."""
kernels_run = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="kernels run on CUDA, or on CPU via test_kernels_under_interpreter"
)


def test_kernels_under_interpreter():
    if CUDA or INTERPRETED:
        pytest.skip("the kernels run directly in this process")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--import-mode=importlib",
         __file__, "-k", "not test_kernels_under_interpreter and not gpu"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]


def test_the_cpu_fallback_is_the_reference():
    logits = torch.randn(2, 3, 50)
    index = torch.randint(0, 50, (2, 3))
    if not INTERPRETED:
        assert torch.equal(
            selective_log_softmax(logits, index), selective_log_softmax_reference(logits, index)
        )
        assert torch.equal(entropy_from_logits(logits), entropy_from_logits_reference(logits))
    by_hand = torch.log_softmax(logits[0, 1], -1)[index[0, 1]]
    assert selective_log_softmax_reference(logits, index, chunk_size=2)[0, 1] == pytest.approx(
        by_hand.item(), abs=1e-6
    )
    p = torch.softmax(logits[1, 2], -1)
    assert entropy_from_logits_reference(logits, chunk_size=2)[1, 2] == pytest.approx(
        -(p * p.log()).sum().item(), abs=1e-5
    )


def views(dtype, vocab=300):
    """(name, logits view, index): contiguous, a sliced batch, a transposed [L, B] view, rows [N, V]."""
    torch.manual_seed(0)
    base = (torch.randn(4, 5, vocab, device=DEVICE) * 3).to(dtype)
    index = torch.randint(0, vocab, (4, 5), device=DEVICE)
    return [
        ("contiguous", base[:2], index[:2]),
        ("batch slice", base[::2], index[::2]),
        ("transposed", base.transpose(0, 1), index.transpose(0, 1)),
        ("rows", base[1], index[1]),
    ]


def assert_close(actual, expected, dtype, what):
    error = (actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)
    assert error < TOLERANCE[dtype], f"{what}: relative error {error:.2e}"


@kernels_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_values_and_gradients(dtype):
    for name, view, index in views(dtype):
        assert not view.is_contiguous() or name in ("contiguous", "rows")
        logits = view.detach().requires_grad_()
        out = selective_log_softmax(logits, index)
        assert out.dtype == torch.float32 and out.shape == index.shape
        grad_out = torch.randn_like(out)
        (out * grad_out).sum().backward()
        reference = view.detach().requires_grad_()
        expected = selective_log_softmax_reference(reference, index)
        (expected * grad_out).sum().backward()
        assert_close(out, expected, torch.float32, f"{name} values")  # float32 math on the same inputs
        assert logits.grad.dtype == dtype
        assert_close(logits.grad, reference.grad, dtype, f"{name} gradient")


@kernels_run
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_values_and_gradients(dtype):
    for name, view, _ in views(dtype):
        logits = view.detach().requires_grad_()
        out = entropy_from_logits(logits)
        assert out.dtype == torch.float32 and out.shape == view.shape[:-1]
        grad_out = torch.randn_like(out)
        (out * grad_out).sum().backward()
        reference = view.detach().requires_grad_()
        expected = entropy_from_logits_reference(reference)
        (expected * grad_out).sum().backward()
        assert_close(out, expected, torch.float32, f"{name} values")  # float32 math on the same inputs
        assert_close(logits.grad, reference.grad, dtype, f"{name} gradient")


@kernels_run
def test_a_sum_backward_reads_an_expanded_gradient():
    """``out.sum().backward()`` hands the kernel a stride-0 gradient."""
    _, view, index = views(torch.float32)[1]
    logits = view.detach().requires_grad_()
    selective_log_softmax(logits, index).sum().backward()
    reference = view.detach().requires_grad_()
    selective_log_softmax_reference(reference, index).sum().backward()
    assert_close(logits.grad, reference.grad, torch.float32, "gradient")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_at_the_qwen_vocabulary(dtype):
    torch.manual_seed(0)
    vocab = 151936
    base = (torch.randn(2, 512, vocab, device="cuda") * 3).to(dtype)
    view = base.transpose(0, 1)  # strided: read in place
    index = torch.randint(0, vocab, (512, 2), device="cuda")
    logits = view.detach().requires_grad_()
    out = selective_log_softmax(logits, index)
    out.sum().backward()
    reference = view.detach().requires_grad_()
    expected = selective_log_softmax_reference(reference, index)
    expected.sum().backward()
    assert_close(out, expected, dtype, "log-prob values")
    assert_close(logits.grad, reference.grad, dtype, "log-prob gradient")
    assert_close(entropy_from_logits(view), entropy_from_logits_reference(view), dtype, "entropy")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_new_packed_length_compiles_nothing():
    """Packed batches change the row length L every step: after the first batch, lengths that are
    and are not multiples of 16 reuse the compiled kernels (no compile in the middle of a run)."""
    from triton import knobs

    compiled = []
    previous, knobs.runtime.jit_post_compile_hook = (
        knobs.runtime.jit_post_compile_hook,
        lambda *, fn, **_: compiled.append(fn.name),
    )
    try:
        for length in (37, 48, 53, 64):
            logits = torch.randn(1, length, 1000, device="cuda", requires_grad=True)
            index = torch.randint(0, 1000, (1, length), device="cuda")
            selective_log_softmax(logits, index).sum().backward()
            entropy_from_logits(logits.detach())
            if length == 37:
                compiled.clear()  # the first batch compiles each kernel once
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == []
