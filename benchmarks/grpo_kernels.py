"""The grpo log-prob kernels against plain torch on a GPU: time and peak memory.

    python benchmarks/grpo_kernels.py                  # 152k vocabulary, 16k tokens, bf16
    python benchmarks/grpo_kernels.py --tokens 4096 --vocab 32000 --dtype float32

Cases (logits [tokens, vocab] already in memory; what each case adds on top is measured):

- ``log-prob forward``: ``selective_log_softmax`` vs ``torch.log_softmax(logits.float()).gather``;
- ``log-prob fwd+bwd``: the same with ``out.sum().backward()`` (the logits' gradient is written
  by both);
- ``entropy``: ``entropy_from_logits`` vs ``-(p * log_softmax(logits.float())).sum(-1)``;
- ``entropy, strided``: the same on a [B, L, V] batch-sliced view (``raw[::2]``), which torch's
  side copies to a contiguous tensor first and the kernel reads in place.

Time: median of ``--iters`` runs after ``--warmup``, CUDA events. Peak memory: the peak allocated
during one call minus what was allocated before it. Ratios: torch / kernel (time: > 1 = faster;
targets 2x) and kernel / torch (memory: targets <= 0.25x).
"""

from __future__ import annotations

import argparse
import statistics


def measure(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median milliseconds, peak extra MiB) of ``fn()``."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def cases(tokens: int, vocab: int, dtype):
    import torch
    from ftcore_grpo.logprobs import entropy_from_logits, selective_log_softmax

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, device="cuda", dtype=dtype)
    index = torch.randint(0, vocab, (tokens,), device="cuda")
    trainable = logits.detach().requires_grad_()
    raw = torch.randn(4, tokens // 2, vocab, device="cuda", dtype=dtype)
    strided = raw[::2]  # [2, tokens/2, vocab]: tokens rows, not contiguous

    def torch_logprob():
        return torch.log_softmax(logits.float(), -1).gather(-1, index[:, None])[:, 0]

    def torch_logprob_backward():
        trainable.grad = None
        torch.log_softmax(trainable.float(), -1).gather(-1, index[:, None])[:, 0].sum().backward()

    def kernel_logprob_backward():
        trainable.grad = None
        selective_log_softmax(trainable, index).sum().backward()

    def torch_entropy(x):
        logp = torch.log_softmax(x.contiguous().float(), -1)
        return -(logp.exp() * logp).sum(-1)

    return [
        ("log-prob forward", torch_logprob, lambda: selective_log_softmax(logits, index)),
        ("log-prob fwd+bwd", torch_logprob_backward, kernel_logprob_backward),
        ("entropy", lambda: torch_entropy(logits), lambda: entropy_from_logits(logits)),
        ("entropy, strided", lambda: torch_entropy(strided), lambda: entropy_from_logits(strided)),
    ], logits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from ftcore_grpo.logprobs import entropy_from_logits, selective_log_softmax

    dtype = getattr(torch, args.dtype)
    # correctness first, at the benchmark's shape
    check = torch.randn(64, args.vocab, device="cuda", dtype=dtype)
    picked = torch.randint(0, args.vocab, (64,), device="cuda")
    expected = torch.log_softmax(check.float(), -1).gather(-1, picked[:, None])[:, 0]
    assert torch.allclose(selective_log_softmax(check, picked), expected, atol=1e-3), "log-prob mismatch"
    logp = torch.log_softmax(check.float(), -1)
    assert torch.allclose(entropy_from_logits(check), -(logp.exp() * logp).sum(-1), atol=1e-3), (
        "entropy mismatch"
    )

    table, logits = cases(args.tokens, args.vocab, dtype)
    logits_mib = logits.numel() * logits.element_size() / 2**20
    print(
        f"\n## grpo kernels on {torch.cuda.get_device_name()}: {args.tokens:,} tokens x {args.vocab:,} vocabulary, "
        f"{args.dtype} logits ({logits_mib:,.0f} MiB), median of {args.iters}\n"
    )
    print("| case | torch ms | kernel ms | speed-up | torch peak MiB | kernel peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, reference, kernel in table:
        t_ms, t_mib = measure(reference, args.warmup, args.iters)
        k_ms, k_mib = measure(kernel, args.warmup, args.iters)
        print(
            f"| {name} | {t_ms:.2f} | {k_ms:.2f} | {t_ms / k_ms:.2f}x | {t_mib:,.0f} | {k_mib:,.0f} "
            f"| {k_mib / t_mib:.3f}x |"
        )
    print("\ntargets: speed-up >= 2x, memory ratio <= 0.25x (fwd+bwd: both write the logits' gradient)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
