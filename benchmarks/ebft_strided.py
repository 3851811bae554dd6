"""EBFT strided mode: the flex-attention block mask against the dense 4-D mask.

    python benchmarks/ebft_strided.py [--shape llama-3.2-1b|tiny] [--masks flex dense] [--seq-len 1024]
                                      [--stride 32] [--context 256] [--generate 8] [--samples 4]
                                      [--steps 5] [--warmup 2] [--device cuda] [--json results.jsonl]

A random-init model of Llama-3.2-1B's shape (bf16 on one CUDA GPU; ``--shape tiny`` for a quick
check, also on the CPU), full fine-tuning with AdamW, and the feature network a frozen copy on the
same GPU, as in ``[ebft] mode = "strided"``. One step is one document of ``--seq-len`` random
tokens: block-parallel generation (``--generate`` forward passes over the whole sequence), the
feature pass, the training forward and backward, and the optimizer step. Reported per mask:
document tokens per second, the whole sequence's length (document plus generated blocks), the
median step time, the peak memory allocated, and the feature pass's share of the step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
    ),
}  # fmt: skip


class Settings:
    """The ``[ebft]`` keys strided mode reads."""

    def __init__(self, args):
        self.stride, self.anchor_offset, self.min_completion_prefix = args.stride, 0, 0
        self.context_length, self.generate_max_len = args.context, args.generate
        self.n_samples_per_prompt, self.temperature, self.top_p = args.samples, 1.0, 1.0
        self.embed_method, self.use_whitening = "last_token", False
        self.alignment_coef, self.diversity_coef = 1.0, 1.0
        self.advantage_estimator, self.rl_coef, self.ce_coef = "rloo", 1.0, 0.03
        self.lm_head_chunk, self.feature_layers = 1024, [0.25, 0.5, 0.75]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(mask: str, args) -> dict:
    from ftcore_ebft.features import FeatureNetwork
    from ftcore_ebft.strided import Layout, anchors, document_loss
    from transformers import AutoConfig, AutoModelForCausalLM

    device, dtype = args.device, torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    attention = "flex_attention" if mask == "flex" else "sdpa"
    config = AutoConfig.for_model("llama", **SHAPES[args.shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention).to(device)
    model.train()
    ebft = Settings(args)
    network = FeatureNetwork(model, ebft.feature_layers)
    feature_seconds = []
    states = network.states

    def timed_states(*a, **k):
        sync(device)
        start = time.perf_counter()
        out = states(*a, **k)
        sync(device)
        feature_seconds.append(time.perf_counter() - start)
        return out

    network.states = timed_states
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)
    sampler = torch.Generator(device).manual_seed(0)  # block tokens are sampled on the model's device
    points = anchors(args.seq_len, 0, ebft)
    total = Layout(
        args.seq_len, points, ebft.n_samples_per_prompt, ebft.generate_max_len, ebft.context_length
    ).total
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, config.vocab_size, (args.seq_len,), generator=generator).to(device)
        sync(device)
        start = time.perf_counter()
        result = document_loss(model, network, ids, 0, ebft, sampler)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    share = statistics.median(feature_seconds[args.warmup :]) / step_time
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {
        "mask": mask, "shape": args.shape, "seq_len": args.seq_len, "sequence": total, "anchors": len(points),
        "tokens_per_s": round(args.seq_len / step_time, 1), "step_s": round(step_time, 3),
        "peak_gib": round(peak, 2), "feature_share": round(share, 3),
    }  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--masks", nargs="+", choices=["flex", "dense"], default=["flex", "dense"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=32)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--generate", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="append one JSON line per mask to this file")
    args = parser.parse_args()
    print("| mask | document tok/s | sequence (doc + blocks) | step s | peak GiB | feature pass share |")
    print("|---|---|---|---|---|---|")
    for mask in args.masks:
        if mask == "flex" and not args.device.startswith("cuda"):
            print("| flex | (needs a CUDA GPU) | | | | |")
            continue
        row = run(mask, args)
        print(
            f"| {mask} | {row['tokens_per_s']:,} | {row['sequence']:,} ({row['anchors']} anchors) | "
            f"{row['step_s']} | {row['peak_gib']} | {row['feature_share']:.0%} |"
        )
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(row) + "\n")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
