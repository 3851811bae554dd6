"""The data path: ``[[datasets]]`` -> canonical rows -> tokens and labels -> packed rows -> cache.

``prepare_sft_data`` does it all for methods whose tokens the core makes (SFT); ``load_rows``
stops at canonical rows for methods that tokenize themselves (DPO through TRL, GRPO prompts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ftcore.data import tokenize
from ftcore.data.cache import digest
from ftcore.data.formats import SCHEMAS, RowFormat
from ftcore.data.sources import ROW, DatasetSpec, read_dataset, worker_count
from ftcore.errors import ConfigError, DataError, PluginError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from ftcore.config import Config
    from ftcore.plugins import Plugins

log = logging.getLogger("ftcore.data")

SFT_SCHEMAS = ("messages", "prompt_completion", "text", "tokens")
SPLITTABLE_SCHEMAS = ("text", "tokens")


@dataclass
class DataBundle:
    """Prepared data: ``train``/``eval`` (``datasets.Dataset`` of input_ids, labels[, position_ids])."""

    train: Any
    eval: Any
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)


def dataset_specs(config: Config, plugins: Plugins, schemas: tuple[str, ...]) -> list[DatasetSpec]:
    """Resolve every ``[[datasets]]`` entry's format and options; check them before reading any data."""
    from pydantic import ValidationError

    if not config.datasets:
        raise ConfigError(
            "no [[datasets]] in the config: add at least one", file=config.source, key="datasets"
        )
    registry = plugins.registry("format")
    specs = []
    for index, section in enumerate(config.datasets):
        key = f"datasets.{index}"
        format_class: type[RowFormat] = registry.get(section.format)
        if getattr(format_class, "schema", None) not in SCHEMAS:
            raise PluginError(
                f"format {section.format!r} declares schema {getattr(format_class, 'schema', None)!r}, "
                f"not one of the canonical schemas {', '.join(SCHEMAS)}",
                plugin=registry.owner(section.format),
            )
        if format_class.schema not in schemas:
            raise ConfigError(
                f"format {section.format!r} produces {format_class.schema!r} rows, but method {config.train.method!r} "
                f"takes {', '.join(schemas)} rows; choose a format that produces one of those",
                file=config.source,
                key=f"{key}.format",
            )
        if not format_class.needs_path and section.path:
            raise ConfigError(
                f"format {section.format!r} generates its rows and reads no file: remove path",
                file=config.source,
                key=f"{key}.path",
            )
        if format_class.needs_path and not section.path:
            raise ConfigError(
                f"format {section.format!r} reads a file: set path", file=config.source, key=f"{key}.path"
            )
        try:
            row_format = format_class(section.options)
        except ValidationError as exc:
            raise ConfigError(
                _options_error(exc, format_class), file=config.source, key=f"{key}.options"
            ) from None
        known = (*row_format.fields, *row_format.optional_fields)  # options may add fields
        for name in section.fields:
            if name not in known:
                raise ConfigError(
                    f"format {section.format!r} reads no field {name!r}{did_you_mean(name, known)}; "
                    f"its fields: {', '.join(known) or 'none'}",
                    file=config.source,
                    key=f"{key}.fields.{name}",
                )
        excess = section.excess_length or format_class.default_excess_length
        if excess == "split" and format_class.schema not in SPLITTABLE_SCHEMAS:
            raise ConfigError(
                f'excess_length = "split" cuts long text into windows; format {section.format!r} makes '
                f"{format_class.schema!r} rows: use drop, truncate or raise",
                file=config.source,
                key=f"{key}.excess_length",
            )
        specs.append(DatasetSpec(index, section, section.format, row_format, excess))
    return specs


def _options_error(exc, format_class) -> str:
    lines = []
    for error in exc.errors():
        name = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            choices = list(format_class.Options.model_fields)
            lines.append(
                f"unknown option {name!r}{did_you_mean(name, choices)}; options: {', '.join(choices) or 'none'}"
            )
        else:
            lines.append(f"option {name!r}: {error['msg']} (got {error.get('input')!r})")
    return "; ".join(lines)


def load_rows(config: Config, plugins: Plugins, schemas: tuple[str, ...] = ("preference",), transform=None):
    """(train, eval or None) ``datasets.Dataset`` of canonical rows, for methods that tokenize themselves.

    Same formats, field mappings, bad-row handling, weights, val_fraction, eval datasets and
    shuffling as ``prepare_sft_data``; a ``ConfigError`` when a dataset's format makes a schema not in ``schemas``.
    ``transform(spec, label, rows)``, when given, maps each source's rows (with their ``_row``
    record numbers, kept) before the split, e.g. to tokenize under ``spec.excess_length`` with
    errors naming the file ``label`` and the row.
    """
    specs = dataset_specs(config, plugins, schemas)
    trains, evals = [], []
    for spec in specs:
        parts = [
            part.rows if transform is None else transform(spec, part.label, part.rows)
            for part in read_dataset(spec, config.data.num_proc)
            if part.rows is not None
        ]
        rows = _concatenate(parts, spec.where).remove_columns([ROW])
        if spec.section.eval:
            evals.append(rows)
            continue
        train, evaluation = _split(rows, config.data.val_fraction, config.train.seed + spec.index)
        trains.append(_weighted(train, spec.section.weight, config.train.seed + spec.index))
        if evaluation is not None:
            evals.append(evaluation)
    train = _concatenate(trains, "the datasets")
    if config.data.shuffle:
        train = train.shuffle(seed=config.train.seed)
    return train, (_concatenate(evals, "the datasets") if evals else None)


def prepare_sft_data(config: Config, plugins: Plugins, tokenizer) -> DataBundle:
    """Tokenized, masked (and packed, with ``train.packing``) train/eval data, from the cache when it has them."""
    from ftcore.data import cache

    specs = dataset_specs(config, plugins, SFT_SCHEMAS)
    _check_tokenizer(config, specs, tokenizer)
    fingerprint = cache.data_fingerprint(config, specs, plugins, tokenizer)
    root = cache.cache_root(config)
    cached = cache.load(root, fingerprint)
    if cached is None:
        train, evaluation, stats = _prepare(config, specs, tokenizer, fingerprint)
        cache.save(root, fingerprint, train, evaluation, stats)
        cached = cache.load(root, fingerprint)
        cached[2]["cache"] = "miss"
    else:
        cached[2]["cache"] = "hit"
    train, evaluation, stats = cached
    stats["cache_dir"] = str(root / fingerprint)
    log.info("data %s: %s", fingerprint, ", ".join(f"{k}={v}" for k, v in stats.items() if k != "datasets"))
    return DataBundle(train, evaluation, fingerprint, stats)


def _check_tokenizer(config: Config, specs: list[DatasetSpec], tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"a fast (Rust) tokenizer is needed to locate trained tokens; {type(tokenizer).__name__} is not one",
            file=config.source,
            key="model.tokenizer",
        )
    schemas = {spec.format.schema for spec in specs}
    if "messages" in schemas and not tokenizer.chat_template:
        raise ConfigError(
            "the tokenizer has no chat template, which chat formats need: set model.chat_template "
            "(a name such as chatml, a .jinja file or an inline template)",
            file=config.source,
            key="model.chat_template",
        )
    if schemas & {"text", "prompt_completion"} and tokenizer.eos_token_id is None:
        raise ConfigError(
            "the tokenizer has no eos token to end text rows with", file=config.source, key="model.tokenizer"
        )


def _prepare(config: Config, specs: list[DatasetSpec], tokenizer, fingerprint: str):
    from ftcore.data.packing import pack

    train_config, data_config = config.train, config.data
    trains, evals, per_dataset = [], [], []
    for spec in specs:
        tokenized, counts = _tokenize_dataset(spec, tokenizer, config, fingerprint)
        per_dataset.append({"dataset": spec.where, **counts})
        if spec.section.eval:
            evals.append(tokenized)
            continue
        train, evaluation = _split(tokenized, data_config.val_fraction, train_config.seed + spec.index)
        trains.append(_weighted(train, spec.section.weight, train_config.seed + spec.index))
        if evaluation is not None:
            evals.append(evaluation)
    train = _concatenate(trains, "the datasets")
    if data_config.val_fraction and not evals:
        raise DataError(
            f"data.val_fraction = {data_config.val_fraction} holds out no row: raise it or set it to 0"
        )
    evaluation = _concatenate(evals, "the datasets") if evals else None
    sequences = len(train)
    seed = train_config.seed if data_config.shuffle else None
    if train_config.packing:
        train = pack(train, train_config.sequence_len, seed)
        evaluation = pack(evaluation, train_config.sequence_len) if evaluation is not None else None
    elif seed is not None:
        train = train.shuffle(seed=seed)
    stats = _summary(train, evaluation, sequences, per_dataset, train_config)
    stats["split_special_tokens"] = data_config.split_special_tokens
    return train, evaluation, stats


def _tokenize_dataset(spec: DatasetSpec, tokenizer, config: Config, fingerprint: str):
    """One dataset's rows tokenized and filtered, and its counts."""
    counts = dict.fromkeys(
        ("read", "skipped", "dropped", "truncated", "untrained", "unlocated", "special_tokens", "sequences"),
        0,
    )
    kept = []
    for part in read_dataset(spec, config.data.num_proc):
        counts["skipped"] += part.skipped
        if part.rows is None or not len(part.rows):
            continue
        counts["read"] += len(part.rows) + part.skipped
        function = tokenize.Tokenizer(
            tokenizer,
            spec.format.schema,
            sequence_len=config.train.sequence_len,
            excess_length=spec.excess_length,
            on_bad_rows=spec.section.on_bad_rows,
            label=part.label,
            train_on=config.data.train_on,
            template_kwargs=config.data.chat_template_kwargs,
            split_special_tokens=config.data.split_special_tokens,
        )
        rows = part.rows.map(
            function,
            batched=True,
            remove_columns=part.rows.column_names,
            features=_token_features(),
            num_proc=worker_count(config.data.num_proc, len(part.rows)),
            load_from_cache_file=False,
            new_fingerprint=digest(fingerprint, part.rows._fingerprint),
            desc="Tokenizing",
        )
        status = np.asarray(rows.data.column("_status"))
        for name, code in (("dropped", tokenize.TOO_LONG), ("truncated", tokenize.TRUNCATED),
                           ("untrained", tokenize.UNTRAINED), ("skipped", tokenize.SKIPPED)):  # fmt: skip
            counts[name] += int((status == code).sum())
        counts["unlocated"] += int(np.asarray(rows.data.column("_unlocated")).sum())
        counts["special_tokens"] += int(np.asarray(rows.data.column("_special")).sum())
        keep = np.flatnonzero((status == tokenize.OK) | (status == tokenize.TRUNCATED))
        counts["sequences"] += len(keep)
        kept.append(rows.select(keep).select_columns(["input_ids", "labels"]))
    for name, what in (("dropped", "longer than train.sequence_len"), ("truncated", "truncated to train.sequence_len"),
                       ("untrained", "without any trained token"), ("skipped", "skipped as bad rows")):  # fmt: skip
        if counts[name]:
            log.warning("%s: %d rows %s", spec.where, counts[name], what)
    if counts["unlocated"]:
        log.warning("%s: %d message parts with their own train flag were not found in the rendered chat "
                    "(the chat template changes them); their messages were not trained", spec.where, counts["unlocated"])  # fmt: skip
    if counts["special_tokens"]:
        log.warning("%s: %d special tokens spelled out in row text, tokenized as %s (data.split_special_tokens)",
                    spec.where, counts["special_tokens"],
                    "plain text" if config.data.split_special_tokens else "special tokens")  # fmt: skip
    if not counts["sequences"]:
        raise DataError(f"{spec.where}: no row is left to train on ({_counts_text(counts)})")
    return _concatenate(kept, spec.where), counts


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v)


def _token_features():
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value("int32")), "labels": List(Value("int32")), "_status": Value("int8"),
        "_row": Value("int64"), "_unlocated": Value("int16"), "_special": Value("int32"),
    })  # fmt: skip


def _split(rows, fraction: float, seed: int):
    """(train, eval or None): ``fraction`` of the rows, at random, held out."""
    if not fraction:
        return rows, None
    count = int(round(len(rows) * fraction))
    if count >= len(rows):
        raise DataError(f"data.val_fraction = {fraction} of {len(rows)} rows leaves no train rows")
    if count == 0:
        return rows, None
    order = np.random.default_rng(seed).permutation(len(rows))
    return rows.select(np.sort(order[count:])), rows.select(np.sort(order[:count]))


def _weighted(rows, weight: float | None, seed: int):
    """``weight`` × the rows: whole copies, plus a random sample for the fraction."""
    if weight is None or weight == 1:
        return rows
    copies, fraction = divmod(weight, 1)
    extra = np.random.default_rng(seed).permutation(len(rows))[: int(round(fraction * len(rows)))]
    indices = np.concatenate([np.arange(len(rows))] * int(copies) + [np.sort(extra)])
    if not len(indices):
        raise DataError(f"weight {weight} keeps none of the {len(rows)} rows: raise the weight")
    return rows.select(indices)


def _concatenate(parts: list, what: str):
    import datasets

    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:
        raise DataError(f"cannot combine the rows of {what}: their columns differ ({exc})") from None


def _summary(train, evaluation, sequences: int, per_dataset: list[dict], train_config) -> dict[str, Any]:
    lengths = _lengths(train)
    tokens = int(lengths.sum())
    trained = _trained_tokens(train)
    totals = {
        key: sum(d[key] for d in per_dataset)
        for key in ("skipped", "dropped", "truncated", "untrained", "unlocated", "special_tokens")
    }
    efficiency = (
        tokens / (len(train) * train_config.sequence_len) if train_config.packing and len(train) else None
    )
    return {
        "rows": len(train),
        "sequences": sequences,
        "tokens": tokens,
        "trained_tokens": trained,
        **totals,
        "packing_efficiency": round(efficiency, 4) if efficiency is not None else None,
        "longest": int(lengths.max()) if len(lengths) else 0,
        "eval_rows": len(evaluation) if evaluation is not None else 0,
        "datasets": per_dataset,
    }


def _lengths(dataset) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(dataset.with_format("arrow")[:].column("input_ids")))


def _trained_tokens(dataset) -> int:
    import pyarrow.compute as pc

    labels = pc.list_flatten(dataset.with_format("arrow")[:].column("labels"))
    return int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0)
