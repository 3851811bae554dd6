"""Preference rows -> the token ids TRL's ``DPOTrainer`` trains on, under ``excess_length``, cached.

Tokenization follows TRL's own (``DPOTrainer._prepare_dataset``, through ``trl.data_utils``):
message lists go through the chat template (the prompt with the generation prompt), strings
through the tokenizer with EOS appended to each completion, and the completions start where the
tokenized prompt and prompt+completion diverge. Special tokens spelled out in row text are plain
text under ``data.split_special_tokens``, as in SFT data (an ``</s>`` ending a completion then stays
text and the eos is added). ftcore tokenizes before the trainer exists so
that the length policy can name files and rows, ``preprocess --show`` shows exactly what
trains, and the tokens are cached under the data fingerprint like SFT data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ftcore.errors import ConfigError, DataError

log = logging.getLogger("ftcore.data")

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
KEPT, TRUNCATED, LONG_PROMPT, TOO_LONG = 0, 1, 2, 3
"""Values of the ``_status`` column of tokenized pairs."""
PAIRS_VERSION = 2  # bump when the tokens made from the same rows change


@dataclass(frozen=True)
class Limits:
    """Token limits of one pair: the whole sequence, the prompt, each completion."""

    max_length: int
    max_prompt: int
    max_completion: int

    @classmethod
    def from_config(cls, config) -> Limits:
        total, dpo = config.train.sequence_len, config.dpo
        return cls(total, min(dpo.max_prompt_length or total, total - 1), dpo.max_completion_length or total)


@dataclass
class PairData:
    """Tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``) for the trainer."""

    train: Any
    eval: Any
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)


def tokenize_pair(
    tokenizer,
    row: dict[str, Any],
    template_kwargs: dict[str, Any] | None = None,
    split_special_tokens: bool = True,
    special_text=None,
) -> dict[str, list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of one preference row, tokenized as TRL does but
    with ``data.split_special_tokens`` honoured (``ftcore.data.encode``)."""
    from ftcore.data import encode
    from trl.data_utils import common_prefix_length, is_conversational

    def tokens(value, **kwargs) -> list[int]:
        return encode(
            tokenizer, value, split_special_tokens=split_special_tokens, special_text=special_text, **kwargs
        )

    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if is_conversational(row):
        kwargs = {"tools": row.get("tools"), "template_kwargs": template_kwargs}
        prompt_ids = tokens(prompt, add_generation_prompt=True, **kwargs)
        with_chosen = tokens(prompt + chosen, **kwargs)
        with_rejected = tokens(prompt + rejected, **kwargs)
    else:
        eos = tokenizer.eos_token_id
        prompt_ids = tokens(prompt)
        with_chosen, with_rejected = (
            ids if ids and ids[-1] == eos else [*ids, eos]
            for ids in (tokens(prompt + chosen), tokens(prompt + rejected))
        )
    start = min(
        common_prefix_length(prompt_ids, with_chosen), common_prefix_length(prompt_ids, with_rejected)
    )
    return {
        "prompt_ids": list(prompt_ids[:start]),
        "chosen_ids": list(with_chosen[start:]),
        "rejected_ids": list(with_rejected[start:]),
    }


def fit_pair(ids: dict[str, list[int]], limits: Limits, truncate: bool) -> tuple[dict[str, list[int]], int]:
    """(ids, status): the pair within ``limits``, or unchanged with the reason it does not fit.

    The prompt is never shortened: a prompt over its limit, or one that leaves no room for a
    completion, is ``LONG_PROMPT``. With ``truncate`` both completions are cut to the room left.
    """
    prompt = len(ids["prompt_ids"])
    room = min(limits.max_completion, limits.max_length - prompt)
    if prompt > limits.max_prompt or room < 1:
        return ids, LONG_PROMPT
    if max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) <= room:
        return ids, KEPT
    if not truncate:
        return ids, TOO_LONG
    return {
        **ids,
        "chosen_ids": ids["chosen_ids"][:room],
        "rejected_ids": ids["rejected_ids"][:room],
    }, TRUNCATED


def _tokenize_and_fit(row, tokenizer, limits: Limits, truncate: bool, **options) -> dict[str, Any]:
    ids, status = fit_pair(tokenize_pair(tokenizer, row, **options), limits, truncate)
    return {**ids, "_status": status}


class PairTokenizer:
    """``load_rows`` transform: one source's canonical rows -> tokenized pairs that fit, with counts."""

    def __init__(self, config, tokenizer):
        from ftcore.data.tokenize import SpecialTokenText

        self.config, self.tokenizer = config, tokenizer
        self.limits = Limits.from_config(config)
        self.options = {  # tokenize_pair's
            "template_kwargs": dict(config.data.chat_template_kwargs),
            "split_special_tokens": config.data.split_special_tokens,
            "special_text": SpecialTokenText(tokenizer),
        }
        self.counts: list[dict[str, Any]] = []

    def __call__(self, spec, label: str, rows):
        from datasets import Features, List, Value
        from trl.data_utils import is_conversational

        if len(rows) and is_conversational(rows[0]) and not self.tokenizer.chat_template:
            raise ConfigError(
                f"{spec.where} holds message lists, which need a chat template: set model.chat_template "
                "(a name such as chatml, a .jinja file or an inline template)",
                file=self.config.source,
                key="model.chat_template",
            )
        features = Features(
            {
                **{c: List(Value("int32")) for c in TOKEN_COLUMNS},
                "_status": Value("int8"),
                "_row": Value("int64"),
            }
        )
        tokenized = rows.map(
            _tokenize_and_fit,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "limits": self.limits,
                "truncate": spec.excess_length == "truncate",
                **self.options,
            },
            remove_columns=[c for c in rows.column_names if c != "_row"],
            features=features,
            num_proc=self.config.data.num_proc if len(rows) >= 4000 else None,
            load_from_cache_file=False,
            desc=f"Tokenizing pairs of {label}",
        )
        status = tokenized.data.column("_status").to_pylist()
        names = {
            "kept": KEPT,
            "truncated": TRUNCATED,
            "dropped_long_prompt": LONG_PROMPT,
            "dropped_too_long": TOO_LONG,
        }
        counts = {name: status.count(code) for name, code in names.items()}
        if spec.excess_length == "raise" and counts["dropped_long_prompt"] + counts["dropped_too_long"]:
            self._raise(rows, status, label)
        self.counts.append({"source": label, **counts})
        for name, what in (("dropped_long_prompt", "dropped: the prompt alone is over its limit"),
                           ("dropped_too_long", "dropped: longer than train.sequence_len"),
                           ("truncated", "with completions truncated to fit")):  # fmt: skip
            if counts[name]:
                log.warning("%s: %d pairs %s", label, counts[name], what)
        keep = [i for i, code in enumerate(status) if code in (KEPT, TRUNCATED)]
        return tokenized.select(keep).remove_columns(["_status"])

    def _raise(self, rows, status: list[int], label: str):
        from ftcore.data.sources import line_number

        index = next(i for i, code in enumerate(status) if code in (LONG_PROMPT, TOO_LONG))
        ids = tokenize_pair(self.tokenizer, rows[index], **self.options)
        prompt, longest = len(ids["prompt_ids"]), max(len(ids["chosen_ids"]), len(ids["rejected_ids"]))
        limits = self.limits
        if status[index] == LONG_PROMPT:
            problem = f"the prompt alone has {prompt} tokens, over its limit of {min(limits.max_prompt, limits.max_length - 1)}"
            fix = 'raise dpo.max_prompt_length / train.sequence_len, or set excess_length = "drop"'
        else:
            problem = (f"prompt ({prompt} tokens) + the longer completion ({longest}) is over the limit "
                       f"(train.sequence_len = {limits.max_length}, dpo.max_completion_length = {limits.max_completion})")  # fmt: skip
            fix = 'raise the limit, or set excess_length = "truncate" (keeps the prompt) or "drop"'
        raise DataError(f"{problem}; {fix}", file=label, row=line_number(label, rows[index]["_row"]))


def prepare_pairs(config, plugins, tokenizer) -> PairData:
    """Tokenized train/eval pairs of the config's datasets, from the data cache when it has them."""
    from ftcore.data import load_rows
    from ftcore.data.cache import cache_root, data_fingerprint, digest, load, save
    from ftcore.data.prepare import dataset_specs

    specs = dataset_specs(config, plugins, ("preference",))
    limits = Limits.from_config(config)
    fingerprint = digest(
        "dpo", PAIRS_VERSION, data_fingerprint(config, specs, plugins, tokenizer), vars(limits)
    )
    root = cache_root(config)
    cached = load(root, fingerprint)
    if cached is None:
        pair_tokenizer = PairTokenizer(config, tokenizer)
        train, evaluation = load_rows(config, plugins, ("preference",), transform=pair_tokenizer)
        if not len(train):
            counts = "; ".join(f"{c['source']}: {counts_text(c)}" for c in pair_tokenizer.counts)
            raise DataError(
                f"no pair is left to train on ({counts}): raise train.sequence_len (or dpo.max_prompt_length), "
                'or set excess_length = "truncate" to keep pairs whose completions are too long'
            )
        stats = {
            "pairs": len(train),
            "eval_pairs": len(evaluation) if evaluation is not None else 0,
            "sources": pair_tokenizer.counts,
        }
        save(root, fingerprint, train, evaluation, stats)
        cached = load(root, fingerprint)
        cached[2]["cache"] = "miss"
    else:
        cached[2]["cache"] = "hit"
    train, evaluation, stats = cached
    stats["cache_dir"] = str(root / fingerprint)
    log.info(
        "dpo data %s: %d train pairs, %d eval pairs (%s)",
        fingerprint,
        stats["pairs"],
        stats["eval_pairs"],
        root / fingerprint,
    )
    return PairData(train, evaluation, fingerprint, stats)


def preview_lines(tokenizer, data: PairData, n: int, *, color: bool = False) -> list[str]:
    """The first ``n`` train pairs (prompt untrained, completions trained, as the core marks them), then a summary."""
    from ftcore.data.preview import IGNORE, render_row

    def render(ids: list[int], trained: bool) -> str:
        return render_row(
            tokenizer, {"input_ids": ids, "labels": ids if trained else [IGNORE] * len(ids)}, color=color
        )

    lines = []
    for index in range(min(n, len(data.train))):
        pair = data.train[index]
        lines += [f"=== pair {index} ===", "prompt:", render(pair["prompt_ids"], False)]
        for side in ("chosen", "rejected"):
            lines += [f"{side}:", render(pair[f"{side}_ids"], True)]
        lines.append("")
    stats = data.stats
    lines += [
        f"data fingerprint {data.fingerprint} (cache {stats['cache']}: {stats['cache_dir']})",
        f"pairs            {stats['pairs']:,} (eval {stats['eval_pairs']:,})",
    ]
    lines += [f"  {source['source']}: {counts_text(source)}" for source in stats["sources"]]
    return lines


def counts_text(counts: dict[str, Any]) -> str:
    """ "kept 48, dropped long prompt 264" from one source's counts (zeros left out)."""
    return ", ".join(
        f"{key.replace('_', ' ')} {value:,}" for key, value in counts.items() if key != "source" and value
    )
