"""MoE expert layers: the scattermoe kernels against transformers' eager and grouped_mm experts.

    python benchmarks/moe.py [--models qwen3-30b-a3b olmoe-1b-7b mixtral-8x7b] [--tokens 2048 8192]
                             [--ranks 16 32 64] [--no-full] [--json results.jsonl]

One real transformers experts module per model (its own class, at that model's layer shape), bf16
on one CUDA GPU, a top-k softmax routing of random router logits. LoRA goes on
experts.gate_up_proj and experts.down_proj through peft's ``target_parameters``: eager and
grouped_mm run peft's generic path (``W + s B A`` folded into the weight every forward),
scattermoe the fused kernels. ``full`` trains the expert weights themselves (no adapter): there
``scattermoe`` is what the plugin runs by default (``[scattermoe] full_finetuning = "grouped_mm"``:
transformers' grouped_mm) and ``scattermoe-kernels`` the kernels (``full_finetuning = "kernels"``). Times
are medians of ``triton.testing.do_bench``; memory is the peak allocated during one
forward+backward above what was allocated before it. Needs ftcore-scattermoe installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch

MODELS = {  # name: (model_type, experts class, E, hidden, intermediate, top-k)
    "qwen3-30b-a3b": ("qwen3_moe", "Qwen3MoeExperts", 128, 2048, 768, 8),
    "olmoe-1b-7b": ("olmoe", "OlmoeExperts", 64, 2048, 1024, 8),
    "mixtral-8x7b": ("mixtral", "MixtralExperts", 8, 4096, 14336, 2),
}
IMPLEMENTATIONS = ["eager", "grouped_mm", "scattermoe"]


class Layer(torch.nn.Module):
    """A container, so that peft's ``experts.*`` parameter targets match as in a real model."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts


def build_experts(name: str):
    from transformers import AutoConfig

    model_type, class_name, experts, hidden, inter, top_k = MODELS[name]
    config = AutoConfig.for_model(
        model_type, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=inter,
        num_experts=experts, num_local_experts=experts, num_experts_per_tok=top_k,
    )  # fmt: skip
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    torch.manual_seed(0)
    layer = getattr(module, class_name)(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.02)
    return layer


def with_lora(experts, rank: int) -> Layer:
    """``experts`` wrapped by peft (a fresh adapter each time; the base weights are shared and frozen)."""
    from ftcore_scattermoe.experts import install_expert_lora
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    layer = inject_adapter_in_model(config, Layer(experts))
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    install_expert_lora(layer)  # only takes effect while experts_implementation == "scattermoe"
    return layer


def route(logits, top_k: int):
    """Normalised softmax top-k routing: (bf16 weights, expert indices), each [tokens, top_k]."""
    weights, index = logits.float().softmax(-1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(torch.bfloat16), index


def measure(step, leaves, rep_ms: int) -> tuple[float, float]:
    """(median ms, peak MiB above the memory allocated before the step)."""
    from triton.testing import do_bench

    step()  # compile and autotune outside the timing
    torch.cuda.synchronize()
    ms = do_bench(step, warmup=rep_ms // 4, rep=rep_ms, grad_to_none=leaves, return_mode="median")
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**20


def run_case(experts, name: str, tokens: int, rank: int | None, rep_ms: int) -> list[dict]:
    """All implementations on one (model, tokens, adapter) case; rank None = full fine-tuning."""
    _, _, num_experts, hidden, _, top_k = MODELS[name]
    if rank is None:
        experts.requires_grad_(True)
        layer = Layer(experts)
    else:
        experts.requires_grad_(False)
        layer = with_lora(experts, rank)
    generator = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=generator).requires_grad_()
    logits = torch.randn(tokens, num_experts, device="cuda", dtype=torch.bfloat16, generator=generator)
    logits.requires_grad_()
    grad_out = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=generator)
    leaves = [x, logits] + [p for p in layer.parameters() if p.requires_grad]

    def forward():
        weights, index = route(logits, top_k)
        return layer.experts(x, index, weights)

    def forward_backward():
        forward().backward(grad_out)

    rows, outputs = [], {}
    for implementation in IMPLEMENTATIONS + (["scattermoe-kernels"] if rank is None else []):
        experts.config._experts_implementation = implementation.removesuffix("-kernels")
        experts.scattermoe_full_finetuning = (
            "kernels" if implementation.endswith("-kernels") else "grouped_mm"
        )
        fwd_ms, _ = measure(forward, leaves, rep_ms)
        step_ms, peak_mib = measure(forward_backward, leaves, rep_ms)
        for leaf in leaves:
            leaf.grad = None
        out = forward()
        out.backward(grad_out)
        outputs[implementation] = (out.detach().float().clone(), x.grad.float().clone())
        rows.append(dict(model=name, tokens=tokens, adapter=f"lora r={rank}" if rank else "full", impl=implementation,
                         fwd_ms=fwd_ms, fwd_bwd_ms=step_ms, peak_mib=peak_mib))  # fmt: skip
    for row in rows:
        ref, ref_dx = outputs["grouped_mm"]
        out, dx = outputs[row["impl"]]
        row["rel_err_y"] = ((out - ref).norm() / ref.norm()).item()
        row["rel_err_dx"] = ((dx - ref_dx).norm() / ref_dx.norm()).item()
        row["speedup_vs_eager"] = rows[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        row["speedup_vs_grouped_mm"] = rows[1]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def profile_kernels(args) -> None:
    """Kernel-level GPU time of scattermoe's forward+backward with expert LoRA, per model and token count."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for name in args.models:
        experts = build_experts(name)
        experts.requires_grad_(False)
        layer = with_lora(experts, args.ranks[0])
        experts.config._experts_implementation = "scattermoe"
        _, _, num_experts, hidden, _, top_k = MODELS[name]
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            logits = torch.randn(tokens, num_experts, device="cuda")
            weights, index = route(logits, top_k)
            for _ in range(3):  # compile and autotune first
                layer.experts(x, index, weights).sum().backward()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    layer.experts(x, index, weights).sum().backward()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            tables.append(f"## {name}, {tokens} tokens, lora r={args.ranks[0]}, 5 forward+backward\n{table}")
        del experts, layer
        torch.cuda.empty_cache()
    with open(args.profile, "w") as handle:
        handle.write("\n\n".join(tables))
    print("\n\n".join(tables))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[2048, 8192])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument(
        "--no-full", action="store_true", help="skip full fine-tuning of the experts (no adapter)"
    )
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench time per measurement")
    parser.add_argument("--json", help="also append every row to this JSON-lines file")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="instead of the table: torch.profiler kernel table of scattermoe forward+backward for each "
        "(model, tokens, first rank), written to FILE",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/moe.py needs a CUDA GPU")
    import transformers
    import triton
    from ftcore_scattermoe.experts import register

    register()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}, bf16")  # fmt: skip
    if args.profile:
        profile_kernels(args)
        return
    print(
        "| model | tokens | adapter | impl | fwd ms | fwd+bwd ms | peak MiB | x eager | x grouped_mm | rel err y / dx |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        experts = build_experts(name)
        for tokens in args.tokens:
            for rank in [*args.ranks, *([] if args.no_full else [None])]:
                for row in run_case(experts, name, tokens, rank, args.rep_ms):
                    print(f"| {row['model']} | {row['tokens']} | {row['adapter']} | {row['impl']} | {row['fwd_ms']:.2f} "
                          f"| {row['fwd_bwd_ms']:.2f} | {row['peak_mib']:.0f} | {row['speedup_vs_eager']:.2f} "
                          f"| {row['speedup_vs_grouped_mm']:.2f} | {row['rel_err_y']:.1e} / {row['rel_err_dx']:.1e} |",
                          flush=True)  # fmt: skip
                    if args.json:
                        with open(args.json, "a") as handle:
                            handle.write(json.dumps(row) + "\n")
        del experts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
