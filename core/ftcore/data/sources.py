"""Sources: read one ``[[datasets]]`` entry into canonical rows.

A dataset is a local file, a folder of files (or a ``save_to_disk`` folder), a hub id, or the
rows of a generator format. Every file is read through ``datasets`` and converted by the row
format on its own, so an error names the file and the row (the line, in a JSONL file).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcore.data.cache import digest
from ftcore.data.formats import RowFormat
from ftcore.errors import DataError, PluginError

log = logging.getLogger("ftcore.data")

READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROW = "_row"  # 1-based record number in the source file, kept for error messages
WARN_ROWS = 5  # skipped rows logged one by one (per file and process) before only being counted


@dataclass
class DatasetSpec:
    """One ``[[datasets]]`` entry, resolved: its format object and effective settings."""

    index: int
    section: Any  # ftcore.config.DatasetSection
    format_name: str
    format: RowFormat
    excess_length: str

    @property
    def where(self) -> str:
        return f"[[datasets]] {self.index} ({self.section.path or self.format_name})"


@dataclass
class Part:
    """The canonical rows read from one file (or hub split, or generator) of a dataset."""

    label: str
    rows: Any  # datasets.Dataset: the schema's columns plus ROW
    skipped: int


def read_dataset(spec: DatasetSpec, num_proc: int | None = None) -> list[Part]:
    """Canonical rows of every source of ``spec``; bad rows raise or are skipped and counted."""
    parts = []
    for label, raw, skipped, encoded in _raw_sources(spec):
        if raw is None:
            parts.append(Part(label, None, skipped))
            continue
        rows, bad = _canonical(label, raw, spec, num_proc, encoded)
        parts.append(Part(label, rows, skipped + bad))
    if not any(part.rows is not None and len(part.rows) for part in parts):
        raise DataError(f"{spec.where} has no usable rows (every file was empty or every row was skipped)")
    return parts


def _raw_sources(spec: DatasetSpec):
    """(label, raw datasets.Dataset or None, rows skipped while reading, JSON-encoded columns) per source."""
    import datasets

    section, on_bad = spec.section, spec.section.on_bad_rows
    if not spec.format.needs_path:
        try:
            rows = spec.format.generate()
        except ValueError as exc:
            raise DataError(
                f"{spec.where}: format {spec.format_name!r} cannot generate rows: {exc}"
            ) from None
        yield f"<{spec.format_name}>", datasets.Dataset.from_list(rows), 0, ()
        return
    path = local_path(section.path)
    if path is None:
        yield section.path, _from_hub(section.path, section.split), 0, ()
    elif path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            yield str(path), _from_disk(path, section.split), 0, ()
            return
        files = sorted(
            f for f in path.rglob("*")
            if f.suffix in READERS and f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )  # fmt: skip
        if not files:
            raise DataError(f"no data files ({', '.join(READERS)}) in this folder", file=str(path))
        for file in files:
            yield str(file), *_read_file(file, section.split, on_bad)
    else:
        if path.suffix not in READERS:
            raise DataError(
                f"unsupported file type {path.suffix!r}; use one of {', '.join(READERS)}", file=str(path)
            )
        yield str(path), *_read_file(path, section.split, on_bad)


def local_path(value: str) -> Path | None:
    """The existing local file or folder ``value`` names, or None for a hub id; a missing path raises."""
    path = Path(value)
    if path.exists():
        return path
    if path.is_absolute():
        raise DataError(
            "no such file or folder (relative paths resolve from the config file's folder)", file=value
        )
    return None


def _from_disk(path: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"no split {split!r} in this saved dataset (splits: {', '.join(loaded)})", file=str(path)
            )
        return loaded[split]
    return loaded


def _from_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"not a local file or folder, and loading it as a hub dataset failed ({_reason(exc)}). "
            "If it is a local path, fix it (relative paths resolve from the config file's folder); if the hub "
            "is unreachable, download the dataset and point path at the local copy",
            file=name,
        ) from None


def _read_file(path: Path, split: str, on_bad: str) -> tuple[Any, int, tuple[str, ...]]:
    import datasets

    if not split.startswith("train"):
        raise DataError(
            f"a local file has one split, 'train' (slicing such as 'train[:1000]' works); got split = {split!r}",
            file=str(path),
        )
    if path.stat().st_size == 0 or (path.stat().st_size < 4096 and not path.read_bytes().strip()):
        if on_bad == "skip":
            log.warning("%s: empty file skipped", path)
            return None, 0, ()
        raise DataError(
            'the file is empty: expected rows (set on_bad_rows = "skip" to skip it)', file=str(path)
        )
    reader = READERS[path.suffix]
    try:
        rows = datasets.load_dataset(reader, data_files=[str(path)], split=split)
        rows.data.table.validate(full=True)  # pyarrow reads JSON text without checking that it is UTF-8
    except Exception as exc:
        if reader != "json":
            where = _undecodable(path)
            raise DataError(
                f"cannot read it as {path.suffix}: {where[1] if where else _reason(exc)}",
                file=str(path),
                row=where[0] if where else None,
            ) from None
        return _parse_json(path, split, on_bad, exc)
    if reader == "json" and any(isinstance(feature, datasets.Json) for feature in rows.features.values()):
        # A column with values of several types: datasets stores them as JSON, but keeps a string that is
        # itself valid JSON ("2", "true") undecoded, so it would come back changed. Read such files exactly.
        return _parse_json(path, split, on_bad, None)
    return rows, 0, ()


def _parse_json(
    path: Path, split: str, on_bad: str, error: Exception | None
) -> tuple[Any, int, tuple[str, ...]]:
    """Read a JSON(-lines) file with the json module: malformed lines raise or are skipped, values kept exactly.

    Every column comes back as JSON text (decoded again before the row format sees it).
    """
    import datasets

    data = path.read_bytes()
    records, numbers, bad = [], [], 0
    if data.lstrip().startswith(b"["):  # one JSON document, not JSON lines
        try:
            records = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
        except UnicodeDecodeError as exc:
            raise DataError(
                _not_utf8(data, exc), file=str(path), row=data.count(b"\n", 0, exc.start) + 1
            ) from None
        except json.JSONDecodeError as exc:
            raise DataError(
                f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", file=str(path)
            ) from None
        except ValueError as exc:
            raise DataError(str(exc), file=str(path)) from None
        numbers = list(range(1, len(records) + 1))
    else:
        record = 0
        for line_number, raw_line in enumerate(data.splitlines(), start=1):
            if not raw_line.strip():
                continue
            record += 1
            try:
                value = json.loads(raw_line.decode("utf-8"), object_pairs_hook=_unique_keys)
                problem = (
                    None if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"
                )
            except UnicodeDecodeError as exc:
                value, problem = None, _not_utf8(raw_line, exc)
            except json.JSONDecodeError as exc:
                value, problem = None, f"malformed JSON ({exc.msg} at column {exc.colno})"
            except ValueError as exc:  # a duplicated key
                value, problem = None, str(exc)
            if problem is None:
                records.append(value)
                numbers.append(record)
                continue
            if on_bad == "raise":
                raise DataError(
                    f'{problem}; fix the line or set on_bad_rows = "skip" for this dataset',
                    file=str(path),
                    row=line_number,
                )
            bad += 1
            if bad <= WARN_ROWS:
                log.warning("%s, row %d: skipped: %s", path, line_number, problem)
    if error is not None and not bad:
        raise DataError(f"cannot read it: {_reason(error)}", file=str(path)) from None
    if not all(isinstance(r, dict) for r in records):
        raise DataError("expected a JSON array of objects", file=str(path))
    (span,) = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(records)})
    records, numbers = records[span.from_ : span.to], numbers[span.from_ : span.to]
    if not records:
        return None, bad, ()
    columns = list(dict.fromkeys(key for r in records for key in r))
    table = {c: [json.dumps(r[c]) if c in r else None for r in records] for c in columns}
    return datasets.Dataset.from_dict({**table, ROW: numbers}), bad, tuple(columns)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (json keeps the last of equal keys, silently)."""
    found = dict(pairs)
    if len(found) < len(pairs):
        keys = [key for key, _ in pairs]
        raise ValueError(
            f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice in one object"
        )
    return found


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    column = exc.start - data.rfind(b"\n", 0, exc.start)
    return f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8"


def _undecodable(path: Path) -> tuple[int, str] | None:
    """(line, problem) of the first line of ``path`` that is not UTF-8, or None."""
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, _not_utf8(line, exc)
    return None


def _reason(exc: BaseException) -> str:
    """The innermost cause of a library error, as 'Type: message'."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not str(exc)):
        exc = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {exc}"


def line_number(label: str, record: int) -> int:
    """The line of the ``record``-th record (1-based) of a JSON-lines file; ``record`` elsewhere."""
    if not label.endswith((".jsonl", ".json")) or not os.path.isfile(label):
        return record
    seen = 0
    with open(label, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            seen += bool(line.strip())
            if seen == record:
                return number
    return record


def schema_features(schema: str, first: dict[str, Any]):
    """``datasets.Features`` of canonical rows: fixed types for the SFT schemas; for others, typed from the
    first row (strings, numbers and booleans as such, anything else as JSON)."""
    from datasets import Features, Json, List, Value

    known = {
        "messages": {"messages": Json(), "tools": Json()},
        "prompt_completion": {"prompt": Value("string"), "completion": Value("string")},
        "text": {"text": Value("string")},
        "tokens": {"input_ids": List(Value("int32")), "labels": List(Value("int32"))},
    }.get(schema, {})
    scalars = {str: Value("string"), bool: Value("bool"), int: Value("int64"), float: Value("float64")}
    features = {
        column: known.get(column) or scalars.get(type(value), Json())
        for column, value in sorted(first.items())
    }
    return Features({**features, ROW: Value("int64")})


class _Converter:
    """Batched ``datasets.map`` function: raw rows -> canonical rows (bad rows raise or are dropped)."""

    def __init__(self, spec: DatasetSpec, label: str, mapping: dict[str, str], encoded: tuple[str, ...]):
        self.format, self.format_name, self.label = spec.format, spec.format_name, label
        self.mapping, self.encoded = mapping, set(encoded)
        self.on_bad = spec.section.on_bad_rows
        self.columns: list[str] = []
        self.first: dict[str, Any] = {}  # the first good canonical row, to type the columns
        self.warned = 0

    def attempt(self, raw: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None]:
        """(canonical rows, None) or (None, the reason the row is bad)."""
        row = {name: raw[column] for name, column in self.mapping.items()}
        for name, column in self.mapping.items():
            if column in self.encoded and row[name] is not None:
                row[name] = json.loads(row[name])
        missing = [name for name in self.format.fields if row.get(name) is None]
        if missing:
            return None, f"missing value for {missing[0]!r}"
        try:
            canonical = self.format.convert(row)
        except (ValueError, TypeError) as exc:
            return None, str(exc)
        if isinstance(canonical, dict):
            return [canonical], None
        return (list(canonical), None) if canonical else (None, "the row gave no examples")

    def convert(self, raw: dict[str, Any], record: int) -> list[dict[str, Any]] | None:
        canonical, problem = self.attempt(raw)
        if problem is not None:
            if self.on_bad == "raise":
                raise DataError(
                    f'{problem} (format {self.format_name!r}); fix the row or set on_bad_rows = "skip" for this dataset',
                    file=self.label,
                    row=line_number(self.label, record),
                )
            self.warned += 1
            if self.warned <= WARN_ROWS:
                log.warning("%s, row %d: skipped: %s", self.label, line_number(self.label, record), problem)
            return None
        for row in canonical:
            if sorted(row) != self.columns:
                raise PluginError(
                    f"format {self.format_name!r} returned the keys {sorted(row)} for row {record} of {self.label}, "
                    f"but {self.columns} for an earlier row; every row must have the same keys"
                )
        return canonical

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {column: [] for column in [*self.columns, ROW]}
        records = batch[ROW] if ROW in batch else [i + 1 for i in indices]
        for j, record in enumerate(records):
            for canonical in (
                self.convert({column: values[j] for column, values in batch.items()}, record) or ()
            ):
                for column in self.columns:
                    out[column].append(canonical[column])
                out[ROW].append(record)
        return out


def _canonical(label: str, raw, spec: DatasetSpec, num_proc: int | None, encoded: tuple[str, ...]):
    """Apply the field mapping and the row format to one source; return (rows, rows skipped)."""
    fmt = spec.format
    mapping = {name: spec.section.fields.get(name, name) for name in (*fmt.fields, *fmt.optional_fields)}
    missing = [name for name in fmt.fields if mapping[name] not in raw.column_names]
    if missing:
        name = missing[0]
        raise DataError(
            f"no column {mapping[name]!r}, which format {spec.format_name!r} reads as {name!r} "
            f'(columns: {", ".join(raw.column_names)}); map it with fields.{name} = "COLUMN" in {spec.where}',
            file=label,
        )
    converter = _Converter(spec, label, {n: c for n, c in mapping.items() if c in raw.column_names}, encoded)
    for index, row in enumerate(raw):
        canonical, _ = converter.attempt(row)
        if canonical is not None:
            converter.columns, converter.first = sorted(canonical[0]), canonical[0]
            break
        if spec.section.on_bad_rows == "raise":
            converter.convert(row, row.get(ROW, index + 1))  # raises, naming the row
    rows = raw.map(
        converter,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=schema_features(fmt.schema, converter.first),
        num_proc=worker_count(num_proc, len(raw)),
        load_from_cache_file=False,
        new_fingerprint=digest(raw._fingerprint, spec.format_name, spec.section.model_dump(mode="json")),
        desc=f"Reading {Path(label).name}",
    )
    return rows, len(raw) - len(rows.unique(ROW))  # a row may give several canonical rows (one record)


def worker_count(num_proc: int | None, rows: int) -> int | None:
    """Worker processes worth starting for ``rows`` rows (at least 2,000 rows each)."""
    if not num_proc or num_proc < 2:
        return None
    return min(num_proc, rows // 2000) if rows >= 4000 else None
