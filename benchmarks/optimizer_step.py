"""One optimizer step over a real model's parameter shapes: torch's AdamW (fused, foreach) against
ftcore's ``adamw_compiled`` (``ftcore.optimizer.CompiledAdamW``), with and without the clipping's
``grad_scale`` and the divergence check's ``found_inf`` (what ftcore hands a fused step every step).

    python benchmarks/optimizer_step.py                  # Llama-3.2-1B's shapes in bf16, on the GPU
    python benchmarks/optimizer_step.py --model qwen3-0.6b
    python benchmarks/optimizer_step.py --smoke          # a CPU check of the harness (tiny shapes)

Prints, per optimizer, the mean step time (CUDA events, after warm-up steps that include
compilation), the bandwidth counting 14 bytes a bf16 parameter (read weight, gradient and both
moments; write weight and both moments), the first step's wall time, and each one's ratio to
torch's fused AdamW.
"""

from __future__ import annotations

import argparse
import time

SHAPES = {  # hidden, intermediate, layers, query heads x head dim, key-value heads x head dim, vocabulary
    "llama-1b": (2048, 8192, 16, 2048, 512, 128256),
    "qwen3-0.6b": (1024, 3072, 28, 2048, 1024, 151936),
    "tiny": (64, 128, 2, 64, 32, 512),
}


def parameter_shapes(model: str) -> list[tuple[int, ...]]:
    """The trained tensors of a decoder-only model with tied embeddings (norm weights included)."""
    hidden, intermediate, layers, q, kv, vocab = SHAPES[model]
    layer = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q)]
    layer += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate), (hidden,), (hidden,)]
    return [(vocab, hidden), *layer * layers, (hidden,)]


def make_optimizer(name: str, params):
    import torch
    from ftcore.optimizer import CompiledAdamW

    if name.startswith("compiled"):
        return CompiledAdamW(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4, fused=name == "fused", foreach=name == "foreach")


def time_one(name: str, model: str, device: str, dtype, steps: int, warmup: int) -> dict:
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype, generator=generator) * 0.02)
        for shape in parameter_shapes(model)
    ]
    for param in params:
        param.grad = torch.randn(param.shape, device=device, dtype=dtype, generator=generator) * 1e-3
    optimizer = make_optimizer(name, params)
    if name.endswith("+scale+flag"):  # what ftcore's clipping fold and divergence check set
        optimizer.grad_scale = torch.full((), 2.0, device=device)
        optimizer.found_inf = torch.zeros((), device=device)
    started = time.perf_counter()
    optimizer.step()
    synchronize(device)
    first = time.perf_counter() - started
    for _ in range(warmup):
        optimizer.step()
    synchronize(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            optimizer.step()
        end.record()
        synchronize(device)
        seconds = start.elapsed_time(end) / 1000 / steps
    else:
        started = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        seconds = (time.perf_counter() - started) / steps
    count = sum(p.numel() for p in params)
    return {"optimizer": name, "ms": seconds * 1e3, "tb_per_s": count * 14 / seconds / 1e12, "first_s": first}


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama-1b", choices=[m for m in SHAPES if m != "tiny"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--optimizers", default="fused,foreach,compiled,compiled+scale+flag", help="comma-separated"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in float32 on the CPU, 2 steps")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    model = "tiny" if args.smoke else args.model
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    names = [n for n in args.optimizers.split(",") if not (device == "cpu" and n == "fused")]
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    results = [time_one(name, model, device, dtype, steps, warmup) for name in names]
    baseline = next((r["ms"] for r in results if r["optimizer"] == "fused"), None)
    label = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"## optimizer step, {model} shapes, {dtype}, {label}: {steps} timed steps after {warmup} + 1\n")
    print("| optimizer | ms a step | TB/s (14 B a parameter) | first step s | x fused (speed) |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = f"{baseline / r['ms']:.2f}" if baseline else "-"
        print(f"| {r['optimizer']} | {r['ms']:.2f} | {r['tb_per_s']:.2f} | {r['first_s']:.1f} | {ratio} |")
    return results


if __name__ == "__main__":
    main()
