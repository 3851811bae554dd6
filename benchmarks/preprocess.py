"""Data preparation speed: ftcore (read + tokenize + mask + pack + cache) against TRL SFTTrainer.

Both get the same rows (the packaged generated instruction set, Alpaca's shape, replicated to --rows), the same tokenizer (the
stories260K tokenizer with ftcore's ChatML template, whose ``{% generation %}`` blocks let TRL mask
the assistant turns), the same sequence length, packing and number of processes. TRL's time is
``SFTTrainer._prepare_dataset`` on an in-memory dataset (its tokenize, label and BFD-packing maps);
ftcore's is ``prepare_sft_data`` from the JSONL file to the cached, packed dataset.

    python benchmarks/preprocess.py --rows 100000 --mode messages
    python benchmarks/preprocess.py --rows 100000 --mode prompt_completion

``--whole-process`` times what a user waits for instead, start-up included, with both tools'
defaults (one process) and an empty cache: ``ftcore preprocess CONFIG`` (format ``alpaca``,
chatml) against a script that builds TRL's ``SFTTrainer`` (the stories260K model by name, the same
rows as chats, ``assistant_only_loss``, packing), which prepares the dataset while it is built.
The two alternate ``--repeats`` times; medians and the median of the paired ratios are printed:

    python benchmarks/preprocess.py --whole-process --rows 2000 --sequence-len 512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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


TRL_SCRIPT = """
import json, sys
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

rows_path, model, template, sequence_len, output_dir = sys.argv[1:]
chats = []
for line in open(rows_path, encoding="utf-8"):
    row = json.loads(line)
    prompt = row["instruction"] + ("\\n\\n" + row["input"] if row["input"] else "")
    chats.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]})
tokenizer = AutoTokenizer.from_pretrained(model)
tokenizer.chat_template = open(template, encoding="utf-8").read()
tokenizer.pad_token = tokenizer.eos_token
args = SFTConfig(output_dir=output_dir, max_length=int(sequence_len), packing=True, assistant_only_loss=True,
                 report_to=[], use_cpu=True, bf16=False)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chats), processing_class=tokenizer)
print(len(trainer.train_dataset), "packed rows")
"""


def whole_process(rows, sequence_len: int, repeats: int) -> None:
    """Wall seconds of ``ftcore preprocess`` and of building TRL's SFTTrainer, each a fresh process, alternating."""
    from ftcore.chat_templates import CHATML
    from ftcore.testing import stories_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, template = folder / "alpaca.jsonl", folder / "chatml.jinja"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        template.write_text(CHATML, encoding="utf-8")
        times: dict[str, list[float]] = {"ftcore": [], "trl": []}
        for repeat in range(repeats):
            config = folder / f"run{repeat}.toml"
            config.write_text(
                f'[model]\nbase = "{stories_model()}"\nchat_template = "chatml"\n\n'
                f'[[datasets]]\npath = "{path}"\nformat = "alpaca"\n\n'
                f'[data]\ncache_dir = "{folder / f"cache{repeat}"}"\n\n'
                f'[train]\noutput_dir = "{folder / "out"}"\nsequence_len = {sequence_len}\npacking = true\n'
            )
            commands = {
                "ftcore": [sys.executable, "-m", "ftcore.cli", "preprocess", str(config)],
                "trl": [sys.executable, "-c", TRL_SCRIPT, str(path), str(stories_model()), str(template),
                        str(sequence_len), str(folder / "trl")],
            }  # fmt: skip
            for name in ("ftcore", "trl") if repeat % 2 == 0 else ("trl", "ftcore"):
                start = time.perf_counter()
                subprocess.run(commands[name], check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
            print(
                f"pair {repeat + 1}: ftcore {times['ftcore'][-1]:.2f} s, trl {times['trl'][-1]:.2f} s",
                flush=True,
            )
    ratios = [t / f for f, t in zip(times["ftcore"], times["trl"], strict=True)]
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; rows {len(rows)}, sequence_len {sequence_len}, packing on, one process each, "
          f"empty cache, {repeats} alternating pairs")  # fmt: skip
    print(
        f"ftcore preprocess: median {statistics.median(times['ftcore']):.2f} s (min {min(times['ftcore']):.2f})"
    )
    print(f"trl SFTTrainer:    median {statistics.median(times['trl']):.2f} s (min {min(times['trl']):.2f})")
    print(f"ratio (trl s / ftcore s): median of pairs {statistics.median(ratios):.2f}x, "
          f"of medians {statistics.median(times['trl']) / statistics.median(times['ftcore']):.2f}x")  # fmt: skip


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
    parser.add_argument(
        "--whole-process", action="store_true", help="time whole processes, start-up included (see above)"
    )
    args = parser.parse_args()
    rows = alpaca_rows(args.rows)
    if args.whole_process:
        whole_process(rows, args.sequence_len, args.repeats)
        return
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
