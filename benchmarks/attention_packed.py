"""Attention over packed documents, forward + backward: ftcore's ``varlen`` path (torch's flash varlen
kernel) against the other kernels torch offers for the same job, at one training step's shape.

    python benchmarks/attention_packed.py                 # Llama-3.2-1B heads, 8,192 tokens, three packings
    python benchmarks/attention_packed.py --heads 16 --kv-heads 8 --head-dim 128   # Qwen3-0.6B

Packings: documents drawn like the SFT benchmark's rows (log-normal, median ~350 tokens), 16
documents of 512, and one of 8,192. Kernels: ``varlen`` (ftcore.speed, what training runs),
``cudnn-nested`` and ``flash-nested`` (SDPA over a jagged nested tensor with that backend only),
``flex`` (compiled flex_attention with a document-causal block mask). Each row: mean ms of one layer's
forward + backward (CUDA events), its ratio to ``varlen``, and the largest difference of its output
from ``varlen``'s. A kernel that does not run here says why instead. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import random


def packings(tokens: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    drawn, total = [], 0
    while total < tokens:
        length = min(int(rng.lognormvariate(5.85, 0.76)) + 8, tokens - total)
        drawn.append(length)
        total += length
    return {"sft rows": drawn, "16 x 512": [tokens // 16] * 16, f"1 x {tokens}": [tokens]}


def bench(fn, iters: int = 20, warmup: int = 5) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernels(q, k, v, lengths):
    """name -> builder of a function of no arguments that returns the (tokens, heads, dim) output."""
    import torch
    import torch.nn.functional as F
    from ftcore.speed import _flash_varlen, register_varlen_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    register_varlen_attention()  # reads the torch varlen kernel's signature
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=q.device, dtype=torch.int32)
    groups = q.shape[1] // k.shape[1]

    def varlen():
        return _flash_varlen(q, k, v, cu, max(lengths), None, (-1, 0))

    def nested(backend):
        def run():  # the nested tensors are built inside: their cost is the path's
            offsets = cu.long()
            jagged = [
                torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)
                for t in (q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1))
            ]
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(*jagged, is_causal=True)
            return out.transpose(1, 2).values()

        return run

    def flex_kernel():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        document = torch.repeat_interleave(
            torch.arange(len(lengths), device=q.device), torch.tensor(lengths, device=q.device)
        )

        def causal_within_document(b, h, q_index, kv_index):
            return (document[q_index] == document[kv_index]) & (q_index >= kv_index)

        tokens = q.shape[0]
        mask = create_block_mask(causal_within_document, 1, None, tokens, tokens, device=q.device)
        compiled = torch.compile(flex_attention)

        def run():
            heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]
            return compiled(*heads_first, block_mask=mask, enable_gqa=True)[0].transpose(0, 1)

        return run

    return {
        "varlen": lambda: varlen,
        "cudnn-nested": lambda: nested(SDPBackend.CUDNN_ATTENTION),
        "flash-nested": lambda: nested(SDPBackend.FLASH_ATTENTION),
        "flex": flex_kernel,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    import torch

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"## packed attention, forward + backward, {args.heads}/{args.kv_heads} heads of {args.head_dim}, "
          f"bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")  # fmt: skip
    print("| packing | kernel | ms | x varlen (speed) | max diff from varlen |")
    print("|---|---|---|---|---|")
    for packing, lengths in packings(args.tokens).items():
        generator = torch.Generator(device="cuda").manual_seed(0)

        def tensor(heads, generator=generator):
            return torch.randn(
                args.tokens, heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=generator
            ).requires_grad_()

        q, k, v = tensor(args.heads), tensor(args.kv_heads), tensor(args.kv_heads)
        grad = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=generator)
        reference, reference_ms = None, None
        for name, make in kernels(q, k, v, lengths).items():
            try:
                forward = make()
                out = forward()
                ms = bench(lambda forward=forward, grad=grad: forward().backward(grad))
            except Exception as error:  # noqa: BLE001 - a kernel this torch or card lacks: say why, go on
                print(f"| {packing} ({len(lengths)} docs) | {name} | not run: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:120]} | | |")  # fmt: skip
                continue
            if reference is None:
                reference, reference_ms = out.detach(), ms
            diff = (out.detach().float() - reference.float()).abs().max().item()
            print(
                f"| {packing} ({len(lengths)} docs) | {name} | {ms:.3f} | {reference_ms / ms:.2f} | {diff:.3g} |"
            )


if __name__ == "__main__":
    main()
