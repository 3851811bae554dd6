"""Helpers for tests of the data path: a config built in code and the real stories260K tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftcore.testing import stories_model


def data_config(
    tmp_path: Path, datasets: list[dict[str, Any]], *, data: dict[str, Any] | None = None, **train
):
    """(config, plugins) for ``datasets``, caching under ``tmp_path``; ``train`` sets [train] keys."""
    from ftcore.config import validate_config

    raw = {
        "model": {"base": str(stories_model())},
        "datasets": datasets,
        "data": {"cache_dir": str(tmp_path / "cache"), **(data or {})},
        "train": {"output_dir": str(tmp_path / "out"), **train},
    }
    return validate_config(raw, base_dir=tmp_path)


def stories_tokenizer(chat_template: str | None = None, special_tokens: tuple[str, ...] = ()):
    """The stories260K tokenizer with a chat template, extra special tokens and eos as pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_model())
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.chat_template = chat_template
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
