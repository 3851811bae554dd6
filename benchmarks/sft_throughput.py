"""SFT throughput: ftcore against TRL's SFTTrainer on the same GPU, data, shapes and tokens per step.

    python benchmarks/sft_throughput.py          # Llama-3.2-1B: the headline set (DEFAULT_CONFIGS)
    python benchmarks/sft_throughput.py --models qwen3-0.6b --configs trl-bf16-packed-liger-flex-nockpt,ftcore-liger-compile
    python benchmarks/sft_throughput.py --configs all   # every TRL and ftcore configuration
    python benchmarks/sft_throughput.py --list          # the models and configurations, described
    python benchmarks/sft_throughput.py --define 'chunk16=ftcore-liger-compile+liger.chunk_mem_const=16' \
        --configs ftcore-liger-compile,chunk16          # a variant of a configuration, keys set from here
    python benchmarks/sft_throughput.py --profile ftcore-liger-compile   # + kernel time by kind, GPU busy share
    python benchmarks/sft_throughput.py --smoke         # a CPU check of the whole harness (a few minutes)
    python benchmarks/sft_throughput.py --report results-*.jsonl   # the tables of earlier runs

scripts/gpu_speed.sh runs the headline set for Llama-3.2-1B and Qwen3-0.6B in one GPU call. One
configuration took 43-149 s on an H200, most of it start-up and compilation.

Each configuration runs in its own process (``--worker``) with the same warm-up and timed step
counts. Models are random-init real architectures (Llama-3.2-1B, Qwen3-0.6B); the data is real
text (gsm8k, hh-rlhf, oasst1 from the test assets) tokenized once with the stories260K tokenizer
and fed to both trainers as the same token rows. TRL runs in every way a user would: as shipped
(``trl-defaults``: a model handed over in float32, trained under bf16 autocast with gradient
checkpointing, micro-batch 8 padded rows) and tuned for speed (packing, Liger, flex attention,
and ``trl-bf16-*``: a bf16 checkpoint loaded by name with ``model_init_kwargs={"dtype":
torch.bfloat16}``, with and without gradient checkpointing and ``torch_compile``); packed rows are
padded to one shape so that flex attention compiles once, and every configuration but
``trl-defaults`` holds about --tokens-per-step real tokens a step. Reported per configuration:
tokens/s of real tokens (padding not counted) over all timed steps (the mean, the headline) and of
the median timed step, peak GPU memory (allocated), MFU (6 * parameters * mean tokens/s over
989 TFLOP/s, H100/H200 dense bf16); then ftcore's fastest configuration against the fastest TRL
configuration of the same run (by the mean), and ftcore with no tuning keys against TRL as
shipped. On an H100/H200 with the wheels of scripts/fetch_gpu_wheels.sh:
``source scripts/gpu_setup.sh && python benchmarks/sft_throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
TOKENS_PER_STEP = 8192
PAD_ID = 0  # <unk> of the stories tokenizer: the pad token of both trainers, never in the token rows

MODELS = {
    "llama-1b": dict(  # Llama-3.2-1B
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "qwen3-0.6b": dict(  # Qwen3-0.6B
        model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "llama-tiny": dict(  # for smoke runs of this script (CPU too)
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
}  # fmt: skip
DEFAULT_MODELS = ("llama-1b",)


@dataclass(frozen=True)
class TrlSetup:
    """One TRL configuration. Defaults are TRL's: float32 weights (what ``SFTTrainer`` loads by name
    unless told a dtype) under bf16 autocast, gradient checkpointing, SDPA, no Liger, no compile."""

    packed: bool
    liger: bool = False
    attention: str = "sdpa"
    micro_batch: int | None = None  # None: as many padded rows as make about --tokens-per-step
    bf16_weights: bool = False  # loaded by name with model_init_kwargs={"dtype": torch.bfloat16}
    checkpointing: bool = True
    compile: bool = False  # SFTConfig(torch_compile=True)

    def describe(self) -> str:
        rows = "packed" if self.packed else f"padded, micro-batch {self.micro_batch or 'to ~tokens/step'}"
        parts = [
            "bf16 weights" if self.bf16_weights else "fp32 weights + bf16 autocast",
            "checkpointing" if self.checkpointing else "no checkpointing",
            rows,
            "flex" if self.attention == "flex_attention" else self.attention,
            *(["liger"] if self.liger else []),
            *(["torch_compile"] if self.compile else []),
        ]
        return "TRL: " + ", ".join(parts)


FLEX = "flex_attention"
TRL = {
    "trl-defaults": TrlSetup(packed=False, micro_batch=8),  # SFTConfig as shipped
    "trl-padded": TrlSetup(packed=False),
    "trl-packed": TrlSetup(packed=True),
    "trl-packed-liger": TrlSetup(packed=True, liger=True),
    "trl-packed-flex": TrlSetup(packed=True, attention=FLEX),
    "trl-packed-liger-flex": TrlSetup(packed=True, liger=True, attention=FLEX),
    # a bf16 checkpoint loaded by name, as a TRL user tuning for speed would
    "trl-bf16-packed-nockpt": TrlSetup(packed=True, bf16_weights=True, checkpointing=False),
    "trl-bf16-packed-nockpt-compile": TrlSetup(
        packed=True, bf16_weights=True, checkpointing=False, compile=True
    ),
    "trl-bf16-packed-liger-flex": TrlSetup(packed=True, liger=True, attention=FLEX, bf16_weights=True),
    "trl-bf16-packed-liger-flex-nockpt": TrlSetup(
        packed=True, liger=True, attention=FLEX, bf16_weights=True, checkpointing=False
    ),
    "trl-bf16-packed-liger-flex-nockpt-compile": TrlSetup(
        packed=True, liger=True, attention=FLEX, bf16_weights=True, checkpointing=False, compile=True
    ),
}
PEER_DEFAULT = "trl-defaults"

# ftcore configurations: config overrides on top of a packed SFT config with no tuning keys.
LIGER_LOSS_ONLY = {"rms_norm": False, "rope": False, "swiglu": False, "fused_linear_cross_entropy": True}


def liger_compile(every_n_layers: int | None = None) -> dict:
    """Liger's fused linear cross-entropy, compiled decoder layers, optionally every n-th layer checkpointed."""
    model = {"compile": True, "gradient_checkpointing": bool(every_n_layers)}
    if every_n_layers:
        model |= {"checkpoint_every_n_layers": every_n_layers}
    return {"plugins": ["liger"], "liger": LIGER_LOSS_ONLY, "model": model}


FTCORE = {
    "ftcore-default": {},  # gradient checkpointing on, as in TRL's defaults
    "ftcore-nockpt": {"model": {"gradient_checkpointing": False}},
    "ftcore-compile": {"model": {"compile": True, "gradient_checkpointing": False}},
    "ftcore-liger": {"plugins": ["liger"], "model": {"gradient_checkpointing": False}},
    "ftcore-cce-compile": {"plugins": ["cce"], "model": {"compile": True, "gradient_checkpointing": False}},
    "ftcore-liger-compile": liger_compile(),
    "ftcore-liger-compile-ckpt": liger_compile(every_n_layers=1),
    "ftcore-liger-compile-ckpt2": liger_compile(every_n_layers=2),
    "ftcore-liger-compile-ckpt4": liger_compile(every_n_layers=4),
    "ftcore-liger-compile-adamw": liger_compile() | {"train": {"optimizer": "adamw_compiled"}},
}
DEFAULT_CONFIGS = (
    "ftcore-liger-compile",
    "trl-bf16-packed-liger-flex-nockpt",
    "ftcore-liger-compile-ckpt4",
    "trl-packed-liger-flex",
    "ftcore-default",
    PEER_DEFAULT,
    "trl-bf16-packed-liger-flex",
    "trl-bf16-packed-liger-flex-nockpt-compile",
)
"""The headline set, most important first (a --budget leaves out from the end)."""
SMOKE_CONFIGS = (
    PEER_DEFAULT,
    "trl-packed",
    "trl-bf16-packed-nockpt",
    "trl-bf16-packed-nockpt-compile",
    "ftcore-default",
    "ftcore-compile",
)
"""What runs on a CPU (no Liger, no flex attention): ``--smoke`` checks the harness end to end."""


def define(spec: str) -> str:
    """Add an ftcore configuration from ``NAME=BASE+table.key=value+...`` (``--define``): BASE's
    overrides with these keys set (values read as TOML: 16, 1.5, true, "sdpa"). Returns NAME."""
    import tomllib

    name, _, rest = spec.partition("=")
    base, *settings = rest.split("+")
    if not name or base not in FTCORE or name in FTCORE or name in TRL:
        raise ValueError(
            f"--define {spec!r}: expected NEW_NAME=BASE+table.key=value with BASE one of {', '.join(FTCORE)}"
        )
    config = json.loads(json.dumps(FTCORE[base]))
    for setting in settings:
        dotted, _, value = setting.partition("=")
        table, _, key = dotted.partition(".")
        if not key or not value:
            raise ValueError(f"--define {spec!r}: {setting!r} is not table.key=value")
        config.setdefault(table, {})[key] = tomllib.loads(f"v = {value}")["v"]
    FTCORE[name] = config
    return name


def describe(name: str) -> str:
    if name in TRL:
        return TRL[name].describe()
    if name not in FTCORE:
        return "(not a configuration of this version of the benchmark)"
    keys = []
    for table, values in FTCORE[name].items():
        if table == "plugins":
            keys.append(f"plugins={'+'.join(values)}")
            continue
        for key, value in values.items():
            if value is True:
                keys.append(f"{table}.{key}")
            elif key == "gradient_checkpointing":
                keys.append("no checkpointing")
            elif value is not False:
                keys.append(f"{table}.{key}={value}")
    return "ftcore: " + (", ".join(keys) or "no tuning keys")


# ----------------------------------------------------------------------------------------------
# Shared inputs: model folders (config + tokenizer, bf16 weights where a TRL configuration loads
# them by name) and the token rows.


def prepare_inputs(
    work: Path, models: list[str], configs: list[str], rows: int, tokens_per_step: int
) -> dict:
    """Write one folder per model shape and ``rows.jsonl`` of real token rows; return their description."""
    from ftcore.testing import asset, stories_model
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    for name in models:
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        shape = dict(MODELS[name])
        config = AutoConfig.for_model(shape.pop("model_type"), **shape, bos_token_id=1, eos_token_id=2)
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if any(c in TRL and TRL[c].bf16_weights for c in configs):
            save_bf16_checkpoint(folder, work / f"{name}-bf16")
    texts = []
    for line in asset("data/gsm8k/train_first300.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts.append(f"{row['question']}\n{row['answer']}")
    for line in asset("data/hh_rlhf_harmless/harmless_base_test_subset.jsonl").read_text().splitlines():
        texts.append(json.loads(line)["chosen"])
    for line in asset("data/oasst1_chat/oasst_en_threads.jsonl").read_text().splitlines():
        texts.append("\n".join(m["content"] for m in json.loads(line)["messages"]))
    random.Random(0).shuffle(texts)
    ids = tokenizer(texts[:rows], add_special_tokens=False)["input_ids"]
    token_rows = [
        [tokenizer.bos_token_id, *row[: tokens_per_step - 2], tokenizer.eos_token_id] for row in ids
    ]
    with (work / "rows.jsonl").open("w") as handle:
        for row in token_rows:
            handle.write(json.dumps({"input_ids": row}) + "\n")
    lengths = sorted(len(row) for row in token_rows)
    return {
        "rows": len(lengths),
        "median_row": lengths[len(lengths) // 2],
        "mean_row": round(sum(lengths) / len(lengths), 1),
        "tokens_per_step": tokens_per_step,
    }


def save_bf16_checkpoint(source: Path, target: Path) -> None:
    """A random-init bf16 checkpoint of ``source``'s config (safetensors + tokenizer), as a hub model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)


# ----------------------------------------------------------------------------------------------
# The worker: one configuration, one process.


def timing_callback(warmup: int, steps: int, result: dict, profile_path: str | None = None):
    """A TrainerCallback timing steps warmup+1 .. warmup+steps and counting the real tokens they see.

    Step times come from CUDA events recorded at each step end (no host sync inside the window).
    Reported: tokens/s over all timed steps (the mean, the headline) and of the median step (a
    one-off stall, a Triton kernel compiled for a new shape, moves it less). With
    ``profile_path``, the two steps after the timed ones run under torch.profiler: its kernel
    table (by GPU time) is written there, and the result gets the kernel time by kind
    (``kernel_time_by_kind``), which the report prints.
    """
    import torch
    from torch.autograd import DeviceType
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    synchronize = torch.cuda.synchronize if cuda else lambda: None

    class Timing(TrainerCallback):
        def __init__(self):
            self.counts, self.events, self.profiler = [], [], None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            result["parameters"] = sum(p.numel() for p in model.parameters())
            result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            model.register_forward_pre_hook(self.count, with_kwargs=True)
            self.triton_compiles = watch_triton_compiles(state)
            self.start = time.perf_counter()

        def count(self, module, args, kwargs):
            if module.training:
                mask, ids = kwargs.get("attention_mask"), kwargs["input_ids"]
                self.counts.append(
                    mask.sum() if mask is not None and mask.dim() == 2 else (ids != PAD_ID).sum()
                )

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step == 1:
                synchronize()
                result["first_step_s"] = time.perf_counter() - self.start
            if step == warmup:
                self.compiles = frame_compiles()
            if warmup <= step <= warmup + steps:
                if cuda:
                    self.events.append(torch.cuda.Event(enable_timing=True))
                    self.events[-1].record()
                else:
                    self.events.append(time.perf_counter())
            if step == warmup + steps:
                self.finish()
                if profile_path:
                    from torch.profiler import ProfilerActivity, profile

                    self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self.syncs = HostSyncs() if cuda else None
                    self.profiler.start()
                    self.profile_start = time.perf_counter()
            if self.profiler is not None and step == warmup + steps + 2:
                synchronize()
                self.profiler.stop()
                syncs = self.syncs.stop() if self.syncs else "(no CUDA)"
                wall = time.perf_counter() - self.profile_start
                averages = self.profiler.key_averages()
                timeline = sorted(  # kernels only: not CPU ops, not annotations (their time is kernels')
                    (e.time_range.start, e.time_range.end, e.name)
                    for e in self.profiler.events()
                    if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
                )
                kernels: dict[str, float] = {}
                for start, end, name in timeline:
                    kernels[name] = kernels.get(name, 0.0) + (end - start) / 1e6
                result["profile"] = kernel_time_by_kind(kernels, wall)
                gaps = idle_gaps(timeline)
                tables = [
                    averages.table(sort_by=key, row_limit=40)
                    for key in ("cuda_time_total", "self_cpu_time_total")
                ]
                Path(profile_path).write_text(
                    "\n\nBy host time (syncs show as cudaStreamSynchronize / aten::item):\n".join(tables)
                    + "\n\nHost syncs in these steps, by call site (torch.cuda.set_sync_debug_mode):\n"
                    + syncs
                    + "\n\nGPU idle between kernels (the largest gaps, with the kernels around them):\n"
                    + gaps
                )
                self.profiler = None

        def finish(self):
            synchronize()
            if len(self.counts) < warmup + steps:
                raise RuntimeError(
                    f"{len(self.counts)} forwards in {warmup + steps} steps; expected one a step"
                )
            if cuda:
                times = [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:], strict=False)]
            else:
                times = [b - a for a, b in zip(self.events, self.events[1:], strict=False)]
            tokens = [int(c) for c in self.counts[warmup : warmup + steps]]
            rates = sorted(t / s for t, s in zip(tokens, times, strict=True))
            result.update(
                tokens=sum(tokens), seconds=sum(times), step_seconds=[round(t, 4) for t in times],
                tokens_per_second=rates[len(rates) // 2], mean_tokens_per_second=sum(tokens) / sum(times),
                peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
                compiles_in_timed_steps=frame_compiles() - self.compiles,
                triton_compiles_in_timed_steps=[
                    name for step, name in self.triton_compiles if warmup < step <= warmup + steps
                ],
            )  # fmt: skip

    return Timing()


class HostSyncs:
    """While alive, every operation that makes the host wait for the GPU (``.item()``, a copy to the
    host, ...) is recorded with its Python call site; ``stop()`` returns them counted, most first."""

    def __init__(self):
        import collections
        import traceback
        import warnings

        import torch

        self.sites = collections.Counter()
        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                self.sites["".join(traceback.format_stack(limit=7)[:-1])] += 1

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> str:
        import torch

        torch.cuda.set_sync_debug_mode("default")
        self.catcher.__exit__(None, None, None)
        if not self.sites:
            return "none\n"
        return "\n".join(f"{count} x, from:\n{site}" for site, count in self.sites.most_common(10))


KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's name), first match wins
    ("memcpy/memset", ("memcpy", "memset")),
    ("attention", ("flash", "fmha", "flex", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
    ("optimizer", ("adam",)),
    ("grad norm/clip", ("lpnorm", "binaryopscalar")),
    ("loss (liger)", ("liger", "cross_entropy", "element_mul")),
    ("compiled (inductor)", ("triton_",)),
    ("eager elementwise", ("elementwise", "reduce_kernel")),
)


def kernel_time_by_kind(kernels: dict[str, float], wall_seconds: float) -> dict:
    """GPU seconds of profiled kernels (name -> self time) summed by ``KERNEL_KINDS``, and the share
    of the wall time some kernel ran (``busy``): well under 1 means the host could not keep up."""
    kinds: dict[str, float] = {}
    for name, seconds in kernels.items():
        lowered = name.lower()
        kind = next((k for k, parts in KERNEL_KINDS if any(p in lowered for p in parts)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    gpu = sum(kinds.values())
    return {
        "wall_s": round(wall_seconds, 4),
        "gpu_s": round(gpu, 4),
        "busy": round(gpu / wall_seconds, 3) if wall_seconds else 0.0,
        "kinds": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
    }


def idle_gaps(timeline: list[tuple[float, float, str]], top: int = 15) -> str:
    """Where the GPU waited, from (start us, end us, kernel name) sorted by start: the idle total
    between the first kernel and the last, and the ``top`` longest gaps with the kernels around them."""
    gaps, last_end, last_name = [], None, ""
    for start, end, name in timeline:
        if last_end is not None and start > last_end:
            gaps.append((start - last_end, last_name, name))
        if last_end is None or end > last_end:
            last_end, last_name = end, name
    if not gaps:
        return "none\n"
    lines = [f"idle {sum(g for g, _, _ in gaps) / 1000:.2f} ms in {len(gaps)} gaps over "
             f"{(last_end - timeline[0][0]) / 1000:.1f} ms; gaps over 50 us: "
             f"{sum(g for g, _, _ in gaps if g > 50) / 1000:.2f} ms"]  # fmt: skip
    lines += [
        f"{g / 1000:8.3f} ms  after {a[:70]}  before {b[:70]}" for g, a, b in sorted(gaps, reverse=True)[:top]
    ]
    return "\n".join(lines) + "\n"


def watch_triton_compiles(state) -> list[tuple[int, str]]:
    """A list that fills with (step, kernel) for each Triton kernel JIT-compiled (or loaded from the
    disk cache) for a new specialization from now on: Liger's kernels, for one (not inductor's)."""
    compiled: list[tuple[int, str]] = []
    try:
        from triton import knobs
    except ImportError:
        return compiled

    def hook(*, fn, **_):
        compiled.append((state.global_step + 1, fn.name))

    knobs.runtime.jit_post_compile_hook = hook
    return compiled


def frame_compiles() -> int:
    """Frames torch.compile has compiled (or recompiled) in this process so far."""
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


def total_steps(args) -> int:
    return args.warmup + args.steps + (2 if args.profile_to else 0)


def run_trl(name: str, model_dir: Path, work: Path, args, callback, info: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    setup, tokens_per_step = TRL[name], args.tokens_per_step
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(PAD_ID)
    rows = [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]
    max_length = tokens_per_step if setup.packed else 1024  # 1024: TRL's default max_length
    mean = sum(min(len(r["input_ids"]), max_length) for r in rows) / len(rows)
    batch_size = setup.micro_batch or (1 if setup.packed else max(1, round(tokens_per_step / mean)))
    info.update(micro_batch=batch_size, max_length=max_length)
    if setup.bf16_weights:  # a bf16 checkpoint by name, as TRL loads a hub model
        model, init = (
            str(work / f"{args.model}-bf16"),
            {"dtype": torch.bfloat16, "attn_implementation": setup.attention},
        )
    else:  # float32 weights under bf16 autocast, as TRL trains a model it is handed
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(model_dir)
        model, init = AutoModelForCausalLM.from_config(config, attn_implementation=setup.attention), None
    config = SFTConfig(
        output_dir=str(work / f"out-{name}"), max_steps=total_steps(args), per_device_train_batch_size=batch_size,
        learning_rate=2e-5, bf16=torch.cuda.is_available(), logging_steps=args.warmup + args.steps, save_strategy="no",
        report_to="none", packing=setup.packed, max_length=max_length, use_liger_kernel=setup.liger, seed=42,
        disable_tqdm=True, gradient_checkpointing=setup.checkpointing, torch_compile=setup.compile,
        model_init_kwargs=init,
        pad_to_multiple_of=max_length if setup.packed else None,  # one shape: flex attention compiles once
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[callback],
    )  # fmt: skip
    info["weights_dtype"] = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
    trainer.train()


def run_ftcore(name: str, model_dir: Path, work: Path, args, callback, info: dict) -> None:
    from ftcore.config import validate_config
    from ftcore.hookspecs import hookimpl
    from ftcore.pipeline import run_training

    overrides = FTCORE[name]
    raw = {
        "plugins": list(overrides.get("plugins", [])),
        "model": {"base": str(model_dir), "init": "random", "pad_token": "<unk>", **overrides.get("model", {})},
        "datasets": [{"path": str(work / "rows.jsonl"), "format": "pretokenized"}],
        "data": {"cache_dir": str(work / "cache")},
        "train": {
            "output_dir": str(work / f"out-{name}"), "packing": True, "sequence_len": args.tokens_per_step,
            "max_steps": total_steps(args), "logging_steps": args.warmup + args.steps, "learning_rate": 2e-5,
        },
    }  # fmt: skip
    for table, values in overrides.items():
        if table not in ("plugins", "model"):
            raw[table] = {**raw.get(table, {}), **values}
    config, plugins = validate_config(raw, base_dir=work)
    info.update(micro_batch=1, max_length=args.tokens_per_step, ftcore_config=raw)

    class Probe:
        @hookimpl
        def trainer_callbacks(self, config):
            return [callback]

        @hookimpl
        def after_model_load(self, config, model):
            info["weights_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")

    plugins.pm.register(Probe(), name="benchmark-probe")
    run_training(config, plugins, overwrite=True)


def worker(args) -> None:
    import torch

    work = Path(args.work)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"model": args.model, "config": args.worker, "device": device}
    result |= json.loads((work / "inputs.json").read_text())
    callback = timing_callback(args.warmup, args.steps, result, args.profile_to)
    run = run_trl if args.worker in TRL else run_ftcore
    run(args.worker, work / args.model, work, args, callback, result)
    if "tokens_per_second" not in result:
        raise RuntimeError("the timed steps did not complete")
    result["mfu"] = 6 * result["parameters"] * result["mean_tokens_per_second"] / PEAK_FLOPS
    with open(args.result, "a") as handle:
        handle.write(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------------------------
# The driver: inputs once, one worker process per configuration, then the table.


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(results: list[dict]) -> str:
    """Per model: every configuration, then ftcore's best against the fastest TRL configuration
    (both by tokens/s over all timed steps) and ftcore's defaults against TRL's."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        done = [r for r in rows if "mean_tokens_per_second" in r]
        first = done[0] if done else rows[0]
        lines += [
            f"\n## {model} on {first.get('device', '?')}: {first.get('tokens_per_step', '?')} tokens a step, "
            f"median row {first.get('median_row', '?')} tokens, {first.get('warmup', '?')} warm-up + "
            f"{first.get('steps', '?')} timed steps\n",
            "| configuration | setup | weights | tokens/s (mean) | tokens/s (median step) | peak GiB | MFU (mean) "
            "| first step s | slowest timed step s (compiles in them) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "mean_tokens_per_second" not in r:
                lines.append(
                    f"| {r['config']} | {describe(r['config'])} | | {r.get('error', '?')} | | | | | |"
                )
                continue
            lines.append(
                f"| {r['config']} | {describe(r['config'])} | {r.get('weights_dtype', '?')} | {r['mean_tokens_per_second']:,.0f} | "
                f"{r['tokens_per_second']:,.0f} | {r['peak_allocated_gib']:.1f} | {r['mfu']:.1%} | {r['first_step_s']:.1f} | "
                f"{max(r['step_seconds']):.3f} ({r.get('compiles_in_timed_steps', '?')} frames, "
                f"{len(r.get('triton_compiles_in_timed_steps', ()))} Triton kernels) |"
            )
        trl = [r for r in done if r["config"] in TRL]
        ours = [r for r in done if r["config"] in FTCORE]
        lines.append("")
        if trl and ours:
            peer = max(trl, key=lambda r: r["mean_tokens_per_second"])
            best = max(ours, key=lambda r: r["mean_tokens_per_second"])
            missing = [name for name in TRL if name not in {r["config"] for r in trl}]
            lines += [
                f"- fastest TRL (mean): {peer['config']}, {peer['mean_tokens_per_second']:,.0f} tokens/s "
                f"(median step {peer['tokens_per_second']:,.0f}), {peer['peak_allocated_gib']:.1f} GiB",
                f"- ftcore best (mean): {best['config']}, {best['mean_tokens_per_second']:,.0f} tokens/s "
                f"(median step {best['tokens_per_second']:,.0f}), {best['peak_allocated_gib']:.1f} GiB, MFU {best['mfu']:.1%}",
                f"- **ftcore best / fastest TRL: {ratio(best['mean_tokens_per_second'], peer['mean_tokens_per_second'])} "
                f"tokens/s (mean), {ratio(best['tokens_per_second'], peer['tokens_per_second'])} (median step), "
                f"{ratio(best['peak_allocated_gib'], peer['peak_allocated_gib'])} peak memory**",
                f"- TRL configurations not in this run: {', '.join(missing) or 'none'}",
            ]
            if peer["peak_allocated_gib"]:  # no GPU, no memory measured
                lines.append(lean_line(ours, peer))
        for r in done:
            if r.get("profile", {}).get("gpu_s"):
                prof = r["profile"]
                shares = ", ".join(f"{k} {v / prof['gpu_s']:.0%}" for k, v in prof["kinds"].items())
                lines.append(
                    f"- profile of {r['config']} (2 steps): GPU busy {prof['busy']:.0%} of {prof['wall_s'] * 1000:.0f} ms; "
                    f"kernel time: {shares}"
                )
        by_name = {r["config"]: r for r in done}
        if "ftcore-default" in by_name and PEER_DEFAULT in by_name:
            ours, theirs = by_name["ftcore-default"], by_name[PEER_DEFAULT]
            lines.append(
                f"- **ftcore-default / {PEER_DEFAULT}: {ratio(ours['mean_tokens_per_second'], theirs['mean_tokens_per_second'])} "
                f"tokens/s (mean), {ratio(ours['tokens_per_second'], theirs['tokens_per_second'])} (median step), "
                f"{ratio(ours['peak_allocated_gib'], theirs['peak_allocated_gib'])} peak memory**"
            )
    return "\n".join(lines)


LEAN_MEMORY = 0.85
"""Issue 20's memory bound: ftcore's configuration at most this fraction of the fastest TRL's peak."""


def lean_line(ours: list[dict], peer: dict) -> str:
    """ftcore's fastest configuration (by the mean) within ``LEAN_MEMORY`` of ``peer``'s peak memory."""
    lean = [r for r in ours if r["peak_allocated_gib"] <= LEAN_MEMORY * peer["peak_allocated_gib"]]
    if not lean:
        return f"- no ftcore configuration of this run peaked at or below {LEAN_MEMORY}x the fastest TRL's memory"
    best = max(lean, key=lambda r: r["mean_tokens_per_second"])
    return (
        f"- **ftcore's fastest within {LEAN_MEMORY}x its memory: {best['config']}, "
        f"{ratio(best['mean_tokens_per_second'], peer['mean_tokens_per_second'])} tokens/s (mean), "
        f"{ratio(best['tokens_per_second'], peer['tokens_per_second'])} (median step), "
        f"{ratio(best['peak_allocated_gib'], peer['peak_allocated_gib'])} peak memory**"
    )


def record(result_file: Path, model: str, name: str, error: str) -> dict:
    """A configuration that gave no result, appended to the results beside the others."""
    row = {"model": model, "config": name, "error": error}
    with result_file.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def read_results(paths: list[Path]) -> list[dict]:
    return [
        json.loads(line) for path in paths if path.exists() for line in path.read_text().splitlines() if line
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated configurations (--list), or all"
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=100,
        help="timed steps (enough that a one-off, such as a Triton kernel compiled for a new specialization, "
        "weighs in the mean no more than ~3%%, as in a long run; more than one epoch of the rows is fine)",
    )
    parser.add_argument(
        "--rows", type=int, default=998, help="token rows to use (real text; 998 are packaged)"
    )
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP)
    parser.add_argument(
        "--work", default=None, help="folder for inputs and outputs (default: a temporary one)"
    )
    parser.add_argument("--out", default=None, help="append each result as a JSON line to this file")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run: a configuration starts only with --min-seconds left, and stops when none are",
    )
    parser.add_argument("--min-seconds", type=float, default=90, help="see --budget")
    parser.add_argument(
        "--config-timeout", type=float, default=None, help="stop a configuration after this many seconds"
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help=f"a CPU check of the harness: llama-tiny, {', '.join(SMOKE_CONFIGS)}, 256 tokens a step, 1 + 2 steps",
    )  # fmt: skip
    parser.add_argument(
        "--report",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="print the tables of these result files, then exit",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="CONFIG",
        help="also profile 2 steps after the timed ones of this configuration (table written beside --out)",
    )
    parser.add_argument(
        "--define",
        action="append",
        default=[],
        metavar="NAME=BASE+table.key=value",
        help="add an ftcore configuration: BASE's keys plus these, e.g. "
        "chunk16=ftcore-liger-compile+liger.chunk_mem_const=16 (repeatable; name it in --configs)",
    )
    parser.add_argument("--list", action="store_true", help="list models and configurations, then exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--profile-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        for spec in args.define:
            define(spec)
    except ValueError as error:
        parser.error(str(error))
    if args.list:
        print("models:", ", ".join(MODELS), "\nconfigurations:")
        for name in [*TRL, *FTCORE]:
            print(f"  {name}: {describe(name)}")
        return 0
    if args.report:
        print(report(read_results(args.report)))
        return 0
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.models, args.configs, args.rows, args.tokens_per_step = (
            "llama-tiny",
            ",".join(SMOKE_CONFIGS),
            64,
            256,
        )
        args.warmup, args.steps = 1, 2
    models = args.models.split(",")
    configs = [*TRL, *FTCORE] if args.configs == "all" else args.configs.split(",")
    unknown = [c for c in configs if c not in TRL and c not in FTCORE] + [
        m for m in models if m not in MODELS
    ]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}; see --list")
    started = time.monotonic()
    work = Path(args.work or tempfile.mkdtemp(prefix="ftcore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    info = prepare_inputs(work, models, configs, args.rows, args.tokens_per_step)
    info |= {"warmup": args.warmup, "steps": args.steps}
    (work / "inputs.json").write_text(json.dumps(info))
    print(f"inputs in {work}: {info}", flush=True)
    result_file = Path(args.out or work / "results.jsonl")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout: stop the worker, report what ran
    results = []
    try:
        for model in models:
            for name in configs:
                timeout = args.config_timeout
                if args.budget is not None:
                    left = args.budget - (time.monotonic() - started)
                    if left < args.min_seconds:
                        results.append(record(result_file, model, name, "not run: --budget spent"))
                        continue
                    timeout = min(timeout or left, left)
                results.append(run_worker(model, name, work, result_file, args, timeout))
    finally:
        print(report(results))
    return 0


def run_worker(model: str, name: str, work: Path, result_file: Path, args, timeout: float | None) -> dict:
    """Run one configuration in its own process; its result, or its error."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--worker", name, "--model", model, "--work", str(work),
               "--result", str(result_file), "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--tokens-per-step", str(args.tokens_per_step),
               *(f"--define={spec}" for spec in args.define)]  # fmt: skip
    if name == args.profile:
        command += ["--profile-to", str(result_file.with_name(f"profile-{model}-{name}.txt"))]
    log = work / f"{model}-{name}.log"
    with log.open("w") as handle:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = f"stopped after {timeout:.0f} s"
        finally:  # a timeout, or this driver stopped by a signal: the worker goes too
            if process.poll() is None:
                process.kill()
                process.wait()
    done = read_results([result_file])
    found = next((r for r in reversed(done) if r["model"] == model and r["config"] == name), None)
    if code or found is None:
        tail = " / ".join(log.read_text().strip().splitlines()[-3:])
        found = record(result_file, model, name, f"exit {code}: {tail}"[:300])
    summary = (
        f"{found['mean_tokens_per_second']:,.0f} tok/s (mean)"
        if "mean_tokens_per_second" in found
        else found["error"]
    )
    print(f"{model} {name}: {summary} ({time.perf_counter() - started:.0f} s)", flush=True)
    shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    return found


if __name__ == "__main__":
    sys.exit(main())
