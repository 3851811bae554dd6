"""Data preparation speed: ftcore (read + tokenize + mask + pack + cache) against TRL SFTTrainer.

Both get the same rows (the packaged generated instruction set, Alpaca's shape, replicated to --rows), the same tokenizer (the
stories260K tokenizer with ftcore's ChatML template, whose ``{% generation %}`` blocks let TRL mask
the assistant turns), the same sequence length, packing and number of processes. TRL's time is
``SFTTrainer._prepare_dataset`` on an in-memory dataset (its tokenize, label and BFD-packing maps);
ftcore's is ``prepare_sft_data`` from the JSONL file to the cached, packed dataset.

    python benchmarks/preprocess.py --rows 100000 --mode messages
    python benchmarks/preprocess.py --rows 100000 --mode prompt_completion
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def alpaca_rows(count: int) -> list[dict]:
    from ftcore.testing import asset

    with open(asset("data/instructions/instructions_2000.jsonl"), encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines]
    return (rows * (count // len(rows) + 1))[:count]


def prompt_of(row: dict) -> str:
    return row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")


def load_tokenizer():
    from ftcore.chat_templates import CHATML
    from ftcore.testing import stories_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    tokenizer.chat_template = CHATML
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def run_ftcore(rows, mode, sequence_len, num_proc, folder: Path) -> tuple[float, dict]:
    """Seconds for ``prepare_sft_data`` from a JSONL file to the cached packed rows (after a warm-up run)."""
    from ftcore.config import validate_config
    from ftcore.data import prepare_sft_data

    def config_for(some_rows, name):
        path = folder / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as out:
            for row in some_rows:
                record = (
                    row
                    if mode == "messages"
                    else {"prompt": prompt_of(row) + "\n", "completion": row["output"]}
                )
                out.write(json.dumps(record) + "\n")
        raw = {
            "model": {"base": str(folder)},
            "datasets": [
                {"path": str(path), "format": "alpaca" if mode == "messages" else "prompt_completion"}
            ],
            "data": {"cache_dir": str(folder / f"cache-{name}"), "num_proc": num_proc},
            "train": {"output_dir": str(folder / "out"), "sequence_len": sequence_len, "packing": True},
        }
        return validate_config(raw)

    tokenizer = load_tokenizer()
    prepare_sft_data(*config_for(rows[:200], "warmup"), tokenizer)  # imports and first-call costs, as TRL's
    config, plugins = config_for(rows, "rows")
    start = time.perf_counter()
    bundle = prepare_sft_data(config, plugins, tokenizer)
    return time.perf_counter() - start, bundle.stats


def run_trl(rows, mode, sequence_len, num_proc, folder: Path) -> tuple[float, int]:
    import datasets
    from ftcore.testing import stories_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_caching()
    if mode == "messages":
        records = [
            {
                "messages": [
                    {"role": "user", "content": prompt_of(r)},
                    {"role": "assistant", "content": r["output"]},
                ]
            }
            for r in rows
        ]
    else:
        records = [{"prompt": prompt_of(r) + "\n", "completion": r["output"]} for r in rows]
    dataset = datasets.Dataset.from_list(records)
    tokenizer = load_tokenizer()
    args = SFTConfig(
        output_dir=str(folder / "trl"), max_length=sequence_len, packing=True, dataset_num_proc=num_proc,
        assistant_only_loss=mode == "messages", report_to=[], use_cpu=True, bf16=False,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(stories_model())
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset.select(range(8)), processing_class=tokenizer
    )
    start = time.perf_counter()
    prepared = trainer._prepare_dataset(dataset, tokenizer, args, True, None, "train")
    return time.perf_counter() - start, len(prepared)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--mode", choices=["messages", "prompt_completion"], default="messages")
    parser.add_argument("--sequence-len", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=os.cpu_count())
    parser.add_argument(
        "--repeats", type=int, default=1, help="Alternate the two this many times; keep the best."
    )
    args = parser.parse_args()
    rows = alpaca_rows(args.rows)
    ftcore_seconds = trl_seconds = float("inf")
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            seconds, stats = run_ftcore(rows, args.mode, args.sequence_len, args.num_proc, Path(tmp))
            ftcore_seconds = min(ftcore_seconds, seconds)
            seconds, trl_rows = run_trl(rows, args.mode, args.sequence_len, args.num_proc, Path(tmp))
            trl_seconds = min(trl_seconds, seconds)
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; rows {args.rows}, mode {args.mode}, "
          f"sequence_len {args.sequence_len}, packing on, num_proc {args.num_proc}, best of {args.repeats}")  # fmt: skip
    print(f"ftcore: {ftcore_seconds:.1f} s, {args.rows / ftcore_seconds:,.0f} rows/s -> {stats['rows']} packed rows, "
          f"{stats['tokens']:,} tokens ({stats['trained_tokens']:,} trained), efficiency {stats['packing_efficiency']}")  # fmt: skip
    print(f"trl:    {trl_seconds:.1f} s, {args.rows / trl_seconds:,.0f} rows/s -> {trl_rows} packed rows")
    print(f"ratio (ftcore rows/s / trl rows/s): {trl_seconds / ftcore_seconds:.2f}x")


if __name__ == "__main__":
    main()
