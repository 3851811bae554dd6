"""Prompt rows for grpo: the config's ``prompt_only`` datasets with the prompts tokenized once.

Chat prompts go through the chat template with the generation prompt (``data.chat_template_kwargs``
updated by ``grpo.chat_template_kwargs``); text prompts through the tokenizer as they are. Special
tokens spelled out in a prompt are plain text under ``data.split_special_tokens``, as in SFT data. A
prompt that leaves no room for ``max_completion_length`` tokens within ``train.sequence_len`` is
dropped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ftcore.errors import ConfigError, DataError

log = logging.getLogger("ftcore.data")

SCHEMAS = ("prompt_only",)


@dataclass
class PromptData:
    train: Any
    eval: Any
    fingerprint: str
    dropped: int


def template_kwargs(config) -> dict[str, Any]:
    return {**config.data.chat_template_kwargs, **config.grpo.chat_template_kwargs}


def tokenize_prompt(
    tokenizer, prompt, kwargs: dict[str, Any], split_special_tokens: bool = True, special_text=None
) -> list[int]:
    """The token ids of a text prompt, or of chat messages with the generation prompt (``kwargs``: the
    template's), special tokens spelled out in them plain text with ``split_special_tokens``."""
    from ftcore.data import encode

    return encode(
        tokenizer,
        prompt,
        split_special_tokens=split_special_tokens,
        add_generation_prompt=True,
        template_kwargs=kwargs,
        special_text=special_text,
    )


def prepare_prompts(config, plugins, tokenizer) -> PromptData:
    from ftcore.data import load_rows
    from ftcore.data.cache import data_fingerprint, digest
    from ftcore.data.prepare import dataset_specs
    from ftcore.data.tokenize import SpecialTokenText

    specs = dataset_specs(config, plugins, SCHEMAS)
    kwargs = template_kwargs(config)
    room = config.train.sequence_len - config.grpo.max_completion_length
    train, evaluation = load_rows(config, plugins, SCHEMAS)
    if len(train) and not isinstance(train[0]["prompt"], str) and not tokenizer.chat_template:
        raise ConfigError(
            "the prompts are chat messages, which need a chat template: set model.chat_template "
            "(a name such as chatml, a .jinja file or an inline template)",
            file=config.source,
            key="model.chat_template",
        )

    split, special_text = config.data.split_special_tokens, SpecialTokenText(tokenizer)

    def tokenize(row):
        return {"prompt_ids": tokenize_prompt(tokenizer, row["prompt"], kwargs, split, special_text)}

    dropped = 0
    parts = []
    for rows in (train, evaluation):
        if rows is None:
            parts.append(None)
            continue
        rows = rows.map(tokenize, desc="Tokenizing prompts", load_from_cache_file=False)
        lengths = [len(ids) for ids in rows["prompt_ids"]]
        keep = [i for i, length in enumerate(lengths) if length <= room]
        dropped += len(rows) - len(keep)
        parts.append(rows.select(keep) if len(keep) < len(rows) else rows)
    if dropped:
        log.warning(
            "grpo: %d prompts dropped: longer than train.sequence_len - grpo.max_completion_length = %d tokens",
            dropped,
            room,
        )
    if not len(parts[0]):
        raise DataError(
            f"no prompt is left to train on: every prompt is longer than train.sequence_len ({config.train.sequence_len}) "
            f"- grpo.max_completion_length ({config.grpo.max_completion_length}) tokens; raise sequence_len or lower "
            "max_completion_length"
        )
    # version 2: prompts go through ftcore.data.encode (data.split_special_tokens), which can tokenize
    # text that spells a special token differently than version 1 did
    fingerprint = digest("grpo-prompts", 2, data_fingerprint(config, specs, plugins, tokenizer), kwargs, room)
    return PromptData(parts[0], parts[1], fingerprint, dropped)
