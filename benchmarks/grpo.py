"""GRPO step time: ftcore's grpo method against TRL's GRPOTrainer on the same GPU, prompts and shapes.

    python benchmarks/grpo.py                       # Qwen3-0.6B shape: trl, ftcore-eager, ftcore
    python benchmarks/grpo.py --configs trl,ftcore --completion-length 512
    python benchmarks/grpo.py --model tiny --warmup 1 --steps 2   # a smoke run of this script (CPU too)

Both sides generate with the policy's own ``generate`` (hf backend, no vLLM), from the same random
initialisation shape (Qwen3-0.6B, bf16 weights), on the same gsm8k prompts in the same order (TRL's
seeded sampler on both sides), with the same group size, completion length, micro-batch and
gradient accumulation, beta = 0 and no gradient checkpointing. TRL is configured at its fastest:
a model handed in bf16 (``bf16=True``), ``gradient_checkpointing=False``, its default dynamic KV
cache (its ``cache_implementation = "static"`` runs uncompiled, since it passes
``disable_compile=True``: slower). A random model rarely samples EOS, so almost every completion
runs to the full length on both sides.

Each configuration runs in its own process (``--worker``). Reported: completion tokens trained per
second (completion tokens in the loss forwards of the timed steps over their time; median step and
mean), the median step time, peak GPU memory (allocated), the first step's time (compilation), and
ftcore's time in generation. Configurations:

- ``trl``: TRL ``GRPOTrainer`` as above.
- ``ftcore-eager``: ftcore's grpo method, ``hf_cuda_graph = false`` (transformers' generate, like TRL).
- ``ftcore``: ftcore's grpo method as configured by default: a static KV cache and a compiled,
  CUDA-graphed decode step; the policy forward packed (no padding) with grpo's log-prob kernels.
- ``ftcore-padded``: the same with ``packed_forward = false``: TRL's padded policy forward and its
  fused LM head. The report compares the training part of the step (median step - generation) and
  peak memory with ``ftcore``'s.

    python benchmarks/grpo.py --configs ftcore,ftcore-padded
- ``ftcore-async``, ``ftcore-eager-async``: the same with ``async_prefetch = true``
  (``prefetch_depth = 1``): a copy of the policy generates the next batch in a background thread
  while this one trains, on the second GPU when two are visible (``hf_device = "cuda:1"``). The
  report compares their median step with max(generation, training) of the synchronous run
  (``ftcore`` / ``ftcore-eager``: training = median step - generation); the goal is <= 1.15x.

    python benchmarks/grpo.py --configs ftcore,ftcore-async      # 2 GPUs: generation on the second

On an H100/H200 with the wheels of scripts/fetch_gpu_wheels.sh:
``source scripts/gpu_setup.sh && python benchmarks/grpo.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "qwen3-0.6b": dict(  # Qwen3-0.6B
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "tiny": dict(  # for smoke runs of this script (CPU too)
        model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}  # fmt: skip
CONFIGS = ("trl", "ftcore-eager", "ftcore", "ftcore-padded", "ftcore-async", "ftcore-eager-async")
MAX_PROMPT = 256
"""Prompts longer than this (in tokens) are left out, on both sides."""


def prepare_inputs(work: Path, model: str, prompts: int) -> dict:
    """The model folder (config + the stories tokenizer) and ``prompts.jsonl`` of gsm8k questions."""
    from ftcore.testing import asset, stories_model
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    folder = work / model
    folder.mkdir(parents=True, exist_ok=True)
    shape = dict(MODELS[model])
    AutoConfig.for_model(shape.pop("model_type"), **shape, bos_token_id=1, eos_token_id=2).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    rows = []
    for line in asset("data/gsm8k/train_first300.jsonl").read_text().splitlines():
        row = json.loads(line)
        if len(tokenizer(row["question"])["input_ids"]) <= MAX_PROMPT:
            rows.append({"prompt": row["question"], "answer": row["answer"]})
    rows = rows[:prompts]
    (work / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"prompts": len(rows)}


def reward(completions, **kwargs):
    """Cheap and the same on both sides (TRL hands conversational completions as messages)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [len(text) % 7 / 7 for text in texts]


# ----------------------------------------------------------------------------------------------
# The worker: one configuration, one process.


def timing_callback(warmup: int, steps: int, result: dict):
    """Times steps warmup+1 .. warmup+steps and counts the completion tokens their loss forwards train."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    cuda = torch.cuda.is_available()
    synchronize = torch.cuda.synchronize if cuda else lambda: None

    class Timing(TrainerCallback):
        def __init__(self):
            self.tokens, self.times, self.marks = [], [], []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            result["parameters"] = sum(p.numel() for p in model.parameters())
            compute_loss, timing = GRPOTrainer._compute_loss, self

            def counted(trainer, model, inputs):
                """TRL's loss forward (ftcore's too), padded or packed: its completion tokens."""
                if torch.is_grad_enabled():  # training, not evaluation
                    timing.pending += int(inputs["completion_mask"].sum())
                return compute_loss(trainer, model, inputs)

            GRPOTrainer._compute_loss = counted
            self.start = time.perf_counter()
            self.pending = 0

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            now, step = time.perf_counter(), state.global_step
            if step == 1:
                result["first_step_s"] = now - self.start
            if step == warmup:
                torch.cuda.reset_peak_memory_stats() if cuda else None
            if warmup < step <= warmup + steps:
                self.times.append(now - self.marks[-1])
                self.tokens.append(self.pending)
            self.marks.append(now)
            self.pending = 0
            if step == warmup + steps:
                self.finish()

        def finish(self):
            rates = sorted(t / s for t, s in zip(self.tokens, self.times, strict=True))
            step_times = sorted(self.times)
            result.update(
                completion_tokens=sum(self.tokens), seconds=sum(self.times),
                step_seconds=[round(t, 3) for t in self.times], median_step_s=step_times[len(step_times) // 2],
                tokens_per_second=rates[len(rates) // 2], mean_tokens_per_second=sum(self.tokens) / sum(self.times),
                peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
            )  # fmt: skip

    return Timing()


def run_trl(model_dir: Path, work: Path, args, callback) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    config = GRPOConfig(
        output_dir=str(work / "out-trl"), max_steps=args.warmup + args.steps, learning_rate=1e-6,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.grad_accum,
        num_generations=args.group, max_completion_length=args.completion_length, beta=0.0,
        bf16=torch.cuda.is_available(), gradient_checkpointing=False, optim="adamw_torch_fused",
        logging_steps=args.warmup + args.steps, save_strategy="no", report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), seed=42,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, callbacks=[callback],
    )  # fmt: skip
    trainer.train()


def run_ftcore(name: str, model_dir: Path, work: Path, args, callback, result: dict) -> None:
    import torch
    from ftcore.config import validate_config
    from ftcore.hookspecs import hookimpl
    from ftcore.pipeline import run_training

    (work / "bench_rewards.py").write_text(
        "def reward(completions, **kwargs):\n    return [len(text) % 7 / 7 for text in completions]\n"
    )
    sys.path.insert(0, str(work))
    raw = {
        "plugins": ["grpo"],
        "model": {"base": str(model_dir), "init": "random",
                  "dtype": "bfloat16" if torch.cuda.is_available() else "float32", "gradient_checkpointing": False},
        "datasets": [{"path": str(work / "prompts.jsonl"), "format": "prompt", "options": {"columns": ["answer"]}}],
        "data": {"shuffle": False, "cache_dir": str(work / "cache")},  # TRL's seeded sampler orders prompts
        "train": {
            "method": "grpo", "output_dir": str(work / f"out-{name}"), "max_steps": args.warmup + args.steps,
            "sequence_len": MAX_PROMPT + args.completion_length, "micro_batch_size": args.micro_batch,
            "gradient_accumulation_steps": args.grad_accum, "learning_rate": 1e-6,
            "logging_steps": args.warmup + args.steps, "seed": 42,
        },
        "grpo": {
            "generation": "hf", "num_generations": args.group, "max_completion_length": args.completion_length,
            "rewards": ["bench_rewards:reward"], "hf_cuda_graph": "eager" not in name, "log_completions_steps": 0,
        },
    }  # fmt: skip
    if name == "ftcore-padded":
        raw["grpo"]["packed_forward"] = False
    if name.endswith("-async"):
        raw["grpo"] |= {"async_prefetch": True, "prefetch_depth": 1}
        if torch.cuda.device_count() > 1:
            raw["grpo"]["hf_device"] = "cuda:1"
        result["generation_device"] = raw["grpo"].get("hf_device", "the training GPU")
    config, plugins = validate_config(raw, base_dir=work)
    result["ftcore_config"] = raw

    class Probe:
        @hookimpl
        def trainer_callbacks(self, config):
            return [callback]

    plugins.pm.register(Probe(), name="benchmark-probe")
    run_training(config, plugins, overwrite=True)
    metrics = [json.loads(line) for line in (work / f"out-{name}" / "metrics.jsonl").read_text().splitlines()]
    generation = [row["timing/generation_seconds"] for row in metrics if "timing/generation_seconds" in row]
    if generation:
        result["generation_s_per_step"] = generation[-1]
    lags = [row["policy/version_lag_max"] for row in metrics if "policy/version_lag_max" in row]
    if lags:
        result["version_lag_max"] = lags[-1]


def worker(args) -> None:
    import torch

    work = Path(args.work)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model": args.model, "config": args.worker, "device": device}
    callback = timing_callback(args.warmup, args.steps, result)
    if args.worker == "trl":
        run_trl(work / args.model, work, args, callback)
    else:
        run_ftcore(args.worker, work / args.model, work, args, callback, result)
    if "tokens_per_second" not in result:
        raise RuntimeError("the timed steps did not complete")
    with open(args.result, "a") as handle:
        handle.write(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------------------------
# The driver: inputs once, one worker process per configuration, then the table.


def report(results: list[dict], args) -> str:
    done = [r for r in results if "tokens_per_second" in r]
    device = done[0]["device"] if done else "?"
    completions = args.micro_batch * args.grad_accum
    lines = [
        f"\n## GRPO, {args.model} on {device}: {completions // args.group} prompts x {args.group} completions of "
        f"{args.completion_length} tokens a step, micro-batch {args.micro_batch}, {args.warmup} warm-up + "
        f"{args.steps} timed steps\n",
        "| configuration | completion tokens/s (median step) | (mean) | median step s | generation s | peak GiB "
        "| first step s | x trl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    trl = next((r for r in done if r["config"] == "trl"), None)
    for r in results:
        if "tokens_per_second" not in r:
            lines.append(f"| {r['config']} | failed: {r.get('error', '?')} |")
            continue
        ratio = f"{r['tokens_per_second'] / trl['tokens_per_second']:.2f}" if trl else "-"
        generation = f"{r['generation_s_per_step']:.2f}" if "generation_s_per_step" in r else "-"
        lines.append(
            f"| {r['config']} | {r['tokens_per_second']:,.0f} | {r['mean_tokens_per_second']:,.0f} "
            f"| {r['median_step_s']:.2f} | {generation} | {r['peak_allocated_gib']:.1f} | {r['first_step_s']:.1f} "
            f"| {ratio} |"
        )
    for r in done:
        if trl and r is not trl:
            memory = (
                r["peak_allocated_gib"] / trl["peak_allocated_gib"]
                if trl["peak_allocated_gib"]
                else float("nan")
            )
            lines.append(
                f"- {r['config']} vs trl: {r['tokens_per_second'] / trl['tokens_per_second']:.2f}x completion "
                f"tokens trained per second, {memory:.2f}x peak memory"
            )
    padded = next((r for r in done if r["config"] == "ftcore-padded"), None)
    packed = next((r for r in done if r["config"] == "ftcore"), None)
    if padded and packed and "generation_s_per_step" in padded and "generation_s_per_step" in packed:
        trained = [r["median_step_s"] - r["generation_s_per_step"] for r in (packed, padded)]
        memory = (
            packed["peak_allocated_gib"] / padded["peak_allocated_gib"] if padded["peak_allocated_gib"] else 0
        )
        lines.append(
            f"- packed vs padded policy forward (ftcore vs ftcore-padded): training part of the step "
            f"{trained[0]:.2f} s vs {trained[1]:.2f} s ({trained[1] / trained[0]:.2f}x faster)"
            + (f", {memory:.2f}x peak memory" if memory else "")
        )
    for r in done:
        sync = next((s for s in done if f"{s['config']}-async" == r["config"]), None)
        if sync is None or "generation_s_per_step" not in sync:
            continue
        generation, training = (
            sync["generation_s_per_step"],
            sync["median_step_s"] - sync["generation_s_per_step"],
        )
        bound = max(generation, training)
        lines.append(
            f"- {r['config']} (generation on {r.get('generation_device', '?')}, lag {r.get('version_lag_max', '?')}): "
            f"median step {r['median_step_s']:.2f} s; the synchronous {sync['config']}: generation {generation:.2f} s, "
            f"training {training:.2f} s -> {r['median_step_s'] / bound:.2f}x max(generation, training) (goal <= 1.15)"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen3-0.6b", choices=list(MODELS))
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (num_generations)")
    parser.add_argument("--micro-batch", type=int, default=16, help="completions per forward pass")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--completion-length", type=int, default=256, help="max_completion_length")
    parser.add_argument("--prompts", type=int, default=256, help="gsm8k prompts to draw from")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument(
        "--work", default=None, help="folder for inputs and outputs (default: a temporary one)"
    )
    parser.add_argument("--out", default=None, help="append each result as a JSON line to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.micro_batch * args.grad_accum) % args.group:
        parser.error("--group must divide --micro-batch x --grad-accum (the completions of a step)")
    if args.worker:
        worker(args)
        return 0
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="ftcore-grpo-bench-"))
    info = prepare_inputs(work, args.model, args.prompts)
    print(f"inputs in {work}: {info}", flush=True)
    result_file = Path(args.out or work / "results.jsonl")
    results = []
    try:
        for name in configs:
            results.append(run_worker(name, work, result_file, args))
    finally:
        print(report(results, args))
    return 0


def run_worker(name: str, work: Path, result_file: Path, args) -> dict:
    """Run one configuration in its own process; its result, or its error."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--worker", name, "--model", args.model, "--work", str(work),
               "--result", str(result_file), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--group", str(args.group), "--micro-batch", str(args.micro_batch),
               "--grad-accum", str(args.grad_accum), "--completion-length", str(args.completion_length)]  # fmt: skip
    log = work / f"{args.model}-{name}.log"
    with log.open("w") as handle:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    done = [json.loads(line) for line in result_file.read_text().splitlines()] if result_file.exists() else []
    found = next((r for r in reversed(done) if r["model"] == args.model and r["config"] == name), None)
    if code or found is None:
        tail = " / ".join(log.read_text().strip().splitlines()[-3:])
        found = {"model": args.model, "config": name, "error": f"exit {code}: {tail}"[:300]}
    summary = f"{found['tokens_per_second']:,.0f} tok/s" if "tokens_per_second" in found else found["error"]
    print(f"{args.model} {name}: {summary} ({time.perf_counter() - started:.0f} s)", flush=True)
    shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    return found


if __name__ == "__main__":
    sys.exit(main())
