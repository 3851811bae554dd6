"""``ftcore preprocess``: build the data cache, show samples with the trained tokens marked, summarise."""

from __future__ import annotations

import json
from typing import Any

IGNORE = -100
GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def render_row(tokenizer, row: dict[str, Any], *, color: bool) -> str:
    """A tokenized row as text: trained tokens green (``[[...]]`` without colour), packed sequences split."""
    ids, labels = row["input_ids"], row["labels"]
    positions = row.get("position_ids")
    trained = [label != IGNORE for label in labels]
    pieces, start, sequence = [], 0, 1
    for k in range(1, len(ids) + 1):
        new_sequence = positions is not None and k < len(ids) and positions[k] == 0
        if k < len(ids) and trained[k] == trained[start] and not new_sequence:
            continue
        text = tokenizer.decode(ids[start:k])
        if trained[start]:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        pieces.append(text)
        if new_sequence:
            sequence += 1
            marker = f"\n--- sequence {sequence} (position_ids restart) ---\n"
            pieces.append(f"{DIM}{marker}{RESET}" if color else marker)
        start = k
    return "".join(pieces)


def summary(stats: dict[str, Any], fingerprint: str) -> list[str]:
    tokens, trained = stats["tokens"], stats["trained_tokens"]
    packed = stats.get("packing_efficiency")
    lines = [
        f"data fingerprint {fingerprint} (cache {stats['cache']}: {stats['cache_dir']})",
        f"rows             {stats['rows']:,}"
        + (f" ({stats['sequences']:,} sequences packed)" if packed is not None else ""),
        f"tokens           {tokens:,} ({trained:,} trained, {trained / max(tokens, 1):.1%})",
        f"longest row      {stats['longest']:,} tokens",
        f"eval rows        {stats['eval_rows']:,}",
        f"skipped          {stats['skipped']:,} bad rows",
        f"dropped          {stats['dropped']:,} too long, {stats['untrained']:,} without a trained token",
        f"truncated        {stats['truncated']:,}",
    ]
    if stats.get("unlocated"):
        lines.append(
            f"unlocated        {stats['unlocated']:,} message parts not found in the rendered chat (left untrained)"
        )
    if stats.get("special_tokens"):
        lines.append(
            f"special tokens   {stats['special_tokens']:,} spelled out in row text, tokenized as "
            + ("plain text" if stats["split_special_tokens"] else "special tokens")
            + " (data.split_special_tokens)"
        )
    lines.append(
        f"packing          {f'efficiency {packed:.1%} (tokens / rows x sequence_len)' if packed is not None else 'off'}"
    )
    for entry in stats.get("datasets", []):
        counts = ", ".join(f"{key} {value:,}" for key, value in entry.items() if key != "dataset" and value)
        lines.append(f"  {entry['dataset']}: {counts}")
    return lines


def preprocess(config, plugins, show: int = 0, *, color: bool = False) -> list[str]:
    """Prepare the data of ``config`` (filling the cache) and return the lines to print."""
    from ftcore.data.prepare import SFT_SCHEMAS, load_rows, prepare_sft_data
    from ftcore.model import load_tokenizer

    method = plugins.registry("method").get(config.train.method)
    if hasattr(method, "preview"):  # a method that tokenizes its own rows shows them (ftcore.methods)
        return method().preview(config, plugins, load_tokenizer(config), show, color=color)
    schemas = tuple(getattr(method, "row_schemas", SFT_SCHEMAS))
    if not set(schemas) <= set(SFT_SCHEMAS):
        train, evaluation = load_rows(config, plugins, schemas)
        lines = [json.dumps(train[i], ensure_ascii=False, default=str) for i in range(min(show, len(train)))]
        return lines + [
            f"rows {len(train):,} ({', '.join(schemas)}), eval rows {len(evaluation) if evaluation else 0:,}"
        ]
    tokenizer = load_tokenizer(config)
    bundle = prepare_sft_data(config, plugins, tokenizer)
    lines = []
    for i in range(min(show, len(bundle.train))):
        lines += [f"=== sample {i} ===", render_row(tokenizer, bundle.train[i], color=color), ""]
    return lines + summary(bundle.stats, bundle.fingerprint)
