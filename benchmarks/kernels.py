"""Kernel plugins on a GPU: peak memory and tokens/s of a Qwen3-0.6B-shaped training step (152k
vocabulary, 16k tokens a step, bf16, random init) with no plugin, with ``liger``, with ``cce`` and
with ``cce`` with its gradient filter, plus the loss step's extra memory for 16k tokens.

    python benchmarks/kernels.py [--steps 5] [--batch 4] [--seq 4096] [--variants stock,cce]

Each variant runs in its own process (liger's patches are process-wide) through ftcore's real
config and hooks: before_model_load -> patch_model -> after_model_load, then ``compute_loss``
(None: the model's own loss) with ``num_items_in_batch``, backward and an AdamW step.
Gradient checkpointing is on, so the loss is what decides the peak.

The loss step's extra memory is the peak during the loss forward and backward minus the memory
just before it, not counting the lm_head weight gradient; the goal for cce is under 2% of the
bf16 logits tensor it replaces.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
VARIANTS = {  # name: (plugins, plugin tables)
    "stock": ([], {}),
    "liger": (["liger"], {}),
    "cce": (["cce"], {}),
    "cce_filtered": (["cce"], {"cce": {"gradient_filter": True}}),
}
GIB = 1024**3


def train_steps(variant: str, batch_size: int, seq_len: int, steps: int, warmup: int = 2) -> dict:
    import torch
    from ftcore.config import validate_config
    from ftcore.methods import Run
    from transformers import AutoConfig, AutoModelForCausalLM

    plugins, tables = VARIANTS[variant]
    raw = {
        "plugins": plugins,
        "model": {"base": "Qwen/Qwen3-0.6B"},
        "train": {"output_dir": "unused"},
        **tables,
    }
    config, plugins = validate_config(raw)
    run = Run(config=config, plugins=plugins, output_dir=Path(config.train.output_dir))
    model_config = AutoConfig.for_model("qwen3", **QWEN3_0_6B)
    plugins.hook.before_model_load(config=config, model_config=model_config, run=run)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(
            model_config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    plugins.hook.patch_model(config=config, model=model, run=run)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    plugins.hook.after_model_load(config=config, model=model, run=run)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    input_ids = torch.randint(0, model_config.vocab_size, (batch_size, seq_len), device="cuda")
    batch = {"input_ids": input_ids, "labels": input_ids}
    num_items = torch.tensor(batch_size * (seq_len - 1), device="cuda")

    def step():
        loss = plugins.hook.compute_loss(
            config=config, model=model, batch=batch, num_items_in_batch=num_items, run=run
        )
        if loss is None:
            loss = model(**batch, num_items_in_batch=num_items).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "variant": variant,
        "tokens_per_s": batch_size * seq_len * steps / elapsed,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB,
        "loss": losses[-1].item(),
    }


def loss_step_memory(tokens: int) -> dict:
    """Extra memory of one loss forward + backward on ``tokens`` hidden states, per implementation."""
    import torch
    from ftcore_cce.plugin import linear_cross_entropy_sum
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    hidden_size, vocab = QWEN3_0_6B["hidden_size"], QWEN3_0_6B["vocab_size"]
    torch.manual_seed(0)
    hidden = (torch.randn(1, tokens, hidden_size, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device="cuda")

    def stock():  # what transformers' ForCausalLMLoss does: bf16 logits, upcast, cross-entropy
        logits = hidden @ weight.T
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="sum")

    def liger():
        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return loss(weight, hidden[0, :-1], labels[0, 1:])

    def cce():
        return linear_cross_entropy_sum(hidden, weight, labels, impl="cce")

    def cce_filtered():
        return linear_cross_entropy_sum(hidden, weight, labels, impl="cce", gradient_filter=True)

    logits_bytes = tokens * vocab * 2
    results = {"tokens": tokens, "bf16_logits_mib": logits_bytes / 2**20}
    implementations = {"stock": stock, "liger": liger, "cce": cce, "cce_filtered": cce_filtered}
    for name, loss_fn in implementations.items():
        loss_fn().backward()  # compile the kernels first
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_fn().backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before - weight.numel() * weight.element_size()
        results[f"{name}_extra_mib"] = extra / 2**20
        results[f"{name}_extra_fraction_of_logits"] = extra / logits_bytes
        hidden.grad = weight.grad = None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to compare")
    parser.add_argument("--variant", choices=[*VARIANTS, "loss-memory"], help="run one part in this process")
    args = parser.parse_args()
    if args.variant == "loss-memory":
        print(json.dumps(loss_step_memory(args.batch * args.seq)))
        return
    if args.variant:
        print(json.dumps(train_steps(args.variant, args.batch, args.seq, args.steps)))
        return

    import torch

    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.batch}x{args.seq} tokens a step"
    )
    variants = args.variants.split(",")
    results = {}
    for part in [*variants, "loss-memory"]:
        sizes = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        command = [sys.executable, __file__, "--variant", part, *sizes]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[part] = json.loads(output.strip().splitlines()[-1])
    stock = results["stock"]
    print("| plugins | tokens/s | peak GiB | tokens/s vs stock | peak vs stock | loss |")
    print("|---|---|---|---|---|---|")
    for name in variants:
        r = results[name]
        speed, peak = r["tokens_per_s"] / stock["tokens_per_s"], r["peak_gib"] / stock["peak_gib"]
        print(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {speed:.2f}x | {peak:.2f}x | {r['loss']:.4f} |"
        )
    memory = results["loss-memory"]
    print(
        f"\nloss step extra memory, {memory['tokens']} tokens (bf16 logits {memory['bf16_logits_mib']:,.0f} MiB):"
    )
    for name in ("stock", "liger", "cce", "cce_filtered"):
        fraction = memory[f"{name}_extra_fraction_of_logits"]
        print(f"  {name}: {memory[f'{name}_extra_mib']:,.1f} MiB ({100 * fraction:.2f}% of the bf16 logits)")
    goal = memory["cce_extra_fraction_of_logits"] < 0.02
    print(f"cce goal (< 2% of the bf16 logits): {'met' if goal else 'NOT met'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
