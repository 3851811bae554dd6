"""The data fingerprint and the on-disk cache of prepared (tokenized, packed) data.

The fingerprint hashes what decides the tokens: the data content (file bytes; a hub dataset's
``datasets`` fingerprint; a generator's options), the tokenizer (vocabulary, normalisation,
special tokens, chat template), the formats (the version of the plugin owning each, and the source
file of each format class) and the token-changing config values. It never includes
``output_dir``, ``num_proc`` or ``cache_dir``.
The cache is ``<data.cache_dir or ~/.cache/ftcore/data>/<fingerprint>/`` holding ``train/``,
``eval/`` (``save_to_disk`` folders) and ``stats.json``; it is written to a temporary sibling
and renamed, so a cache folder is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import xxhash

from ftcore.errors import ConfigError

PIPELINE_VERSION = 1  # bump when the tokens produced for the same inputs change
CHUNK = 1 << 22


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts."""
    return xxhash.xxh3_128_hexdigest(json.dumps(parts, sort_keys=True, default=str).encode())[:20]


def file_digest(path: Path) -> str:
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def source_digest(spec) -> str:
    """Hash of a dataset's content: file bytes, a hub dataset's fingerprint, or a generator's options."""
    section = spec.section
    if not spec.format.needs_path:
        return digest("generated", spec.format.options.model_dump())
    from ftcore.data.sources import _from_hub, local_path

    path = local_path(section.path)
    if path is None:  # a hub id: datasets fingerprints the files it downloaded
        return digest("hub", section.path, _from_hub(section.path, section.split)._fingerprint)
    if path.is_file():
        return file_digest(path)
    files = sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
    )
    return digest([(str(f.relative_to(path)), file_digest(f)) for f in files])


def code_digest(cls: type) -> str:
    """Hash of the file defining ``cls`` (a format class): editing a format's code, even under an
    editable install at the same version, changes the fingerprint. Classes without a file (made at
    run time) hash their qualified name only."""
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if file is None or not Path(file).is_file():
        return digest(cls.__module__, cls.__qualname__)
    return digest(cls.__module__, cls.__qualname__, file_digest(Path(file)))


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return digest(
        type(tokenizer).__name__,
        vocabulary,
        tokenizer.chat_template,
        tokenizer.special_tokens_map,
        [tokenizer.bos_token_id, tokenizer.eos_token_id],
    )


def data_fingerprint(config, specs, plugins, tokenizer=None) -> str:
    """The fingerprint of the prepared data (``tokenizer=None``: of the canonical rows only)."""
    registry = plugins.registry("format")
    datasets_part = []
    for spec in specs:
        owner = registry.owner(spec.format_name)
        section = spec.section.model_dump(mode="json", exclude={"path"})
        datasets_part.append(
            [
                source_digest(spec),
                section,
                spec.excess_length,
                owner,
                plugins.infos[owner].version,
                code_digest(type(spec.format)),
            ]
        )
    data = config.data.model_dump(mode="json", exclude={"num_proc", "cache_dir"})
    train = {key: getattr(config.train, key) for key in ("sequence_len", "packing", "seed")}
    tokenizer_part = tokenizer_digest(tokenizer) if tokenizer is not None else None
    return digest(PIPELINE_VERSION, datasets_part, data, train, tokenizer_part)


def cache_root(config) -> Path:
    return Path(config.data.cache_dir or Path.home() / ".cache" / "ftcore" / "data")


def load(root: Path, fingerprint: str):
    """(train, eval or None, stats) from the cache, or None on a miss."""
    import datasets

    folder = root / fingerprint
    if not (folder / "stats.json").is_file():
        return None
    stats = json.loads((folder / "stats.json").read_text())
    train = datasets.load_from_disk(str(folder / "train"))
    evaluation = datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    return train, evaluation, stats


def save(root: Path, fingerprint: str, train, evaluation, stats: dict[str, Any]) -> Path:
    """Write the prepared data to ``root/fingerprint`` atomically; return the folder."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{fingerprint}-", dir=root))
    except OSError as exc:
        raise _unwritable(root, exc) from None
    folder = root / fingerprint
    try:
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        if folder.is_dir() and not (folder / "stats.json").is_file():  # left incomplete by hand: replace it
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same data first
            if not (folder / "stats.json").is_file():
                raise
    except OSError as exc:
        raise _unwritable(root, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _unwritable(root: Path, exc: OSError) -> ConfigError:
    return ConfigError(
        f"cannot write the data cache in {root}: {exc.strerror or exc}; set data.cache_dir to a writable folder",
        key="data.cache_dir",
    )
