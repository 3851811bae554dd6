"""Tokenize and mask canonical rows: ``input_ids`` and ``labels`` (-100 = not trained).

``messages`` rows are rendered with the tokenizer's chat template. An assistant message is the
template's ``{% generation %}`` block when the template marks one per assistant message; any
other trained message is located by rendering the conversation up to it (for an assistant
message: up to its generation prompt) and up to its end. The trained characters are then mapped
to tokens through the fast tokenizer's offsets. A token is trained only when every character it
covers is trained, so tokens that straddle differently-flagged parts are masked (conservative).
Parts of a message (``reasoning_content``, content parts with their own ``train`` flag) are found
inside the message's span; a part that cannot be found leaves its message untrained and is counted.

Special tokens spelled out inside row text (``<|im_start|>`` in a user turn, ``</s>`` in an answer)
are counted and, with ``data.split_special_tokens`` (the default), tokenized as the plain text they
are (``SpecialTokenText``); the special tokens a chat template writes stay special.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from ftcore.errors import DataError

log = logging.getLogger("ftcore.data")

IGNORE = -100
NEUTRAL = "\ue000"  # a private-use character: stands in for the first character of special-token text
OK, TRUNCATED, TOO_LONG, UNTRAINED, SKIPPED = 0, 1, 2, 3, 4
"""Values of the ``_status`` column: kept, kept truncated, dropped as too long, dropped with no trained
token, skipped as a bad row (the chat template could not render it)."""
WARN_ROWS = 5
REWRITTEN = ("the chat template changes the special-token text in this row, so it cannot be kept as plain "
             "text; remove it from the row, or set data.split_special_tokens = false")  # fmt: skip
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    if b.startswith(a):
        return len(a)
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _flatten_content(content: Any) -> tuple[str, list[tuple[int, int, bool | None]]]:
    """Content parts joined into one string, and each part's (start, end, train flag) in it."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    text, parts = "", []
    for part in content:
        parts.append((len(text), len(text) + len(part["text"]), part.get("train")))
        text += part["text"]
    return text, parts


class ChatMasker:
    """Renders conversations with a chat template and returns the trained character spans."""

    def __init__(self, tokenizer, train_on: list[str], template_kwargs: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.train_on = set(train_on)
        self.template_kwargs = template_kwargs or {}

    def render(self, conversations: list[list[dict]], tools, generation_prompt: bool, track: bool = False):
        """(texts as ``apply_chat_template(..., tokenize=False)`` renders them, generation blocks or None each).

        With ``track`` and a template that marks assistant text with ``{% generation %}``, each
        text comes with the character spans of its generation blocks.
        """
        from transformers.utils.chat_template_utils import render_jinja_template

        if not conversations:
            return [], []
        template = self.tokenizer.get_chat_template(None, tools)
        track = track and GENERATION_TAG.search(template) is not None
        rendered, blocks = render_jinja_template(
            conversations,
            tools=tools,
            chat_template=template,
            add_generation_prompt=generation_prompt,
            return_assistant_tokens_mask=track,
            **{**self.tokenizer.special_tokens_map, **self.template_kwargs},
        )
        return rendered, (blocks if track else [None] * len(rendered))

    def render_rows(self, conversations: list[list[dict]], tools: list) -> list[str]:
        """The texts of whole conversations as training renders them (ftcore's flags dropped)."""
        plain = [[self._plain(m) for m in conversation] for conversation in conversations]
        return self._render_grouped(plain, tools, False)[0]

    def __call__(
        self, conversations: list[list[dict]], tools: list
    ) -> tuple[list[str], list[np.ndarray], list[int]]:
        """(rendered texts, trained character intervals of each text, unlocated part counts)."""
        plain = [[self._plain(m) for m in conversation] for conversation in conversations]
        texts, blocks = self._render_grouped(plain, tools, False, track=True)
        # Where each trained message is: an assistant message is its generation block when the template
        # marks one block per assistant message; otherwise it is found by rendering the conversation up to
        # where the message starts (for an assistant message: up to its generation prompt) and up to its end.
        found, starts, ends = {}, {}, {}
        for row, conversation in enumerate(conversations):
            assistants = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
            row_blocks = (
                blocks[row] if blocks[row] is not None and len(blocks[row]) == len(assistants) else None
            )
            for i, message in enumerate(conversation):
                if not self._touches_training(message):
                    continue
                if row_blocks is not None and message["role"] == "assistant":
                    found[row, i] = row_blocks[assistants.index(i)]
                    continue
                starts[row, i] = (plain[row][:i], message["role"] == "assistant")
                if i + 1 < len(conversation):
                    ends[row, i] = (plain[row][: i + 1], False)
        start_texts = self._render_requests(starts, tools)
        end_texts = self._render_requests(ends, tools)
        for key in starts:
            full = texts[key[0]]
            end = common_prefix_length(end_texts[key], full) if key in ends else len(full)
            found[key] = (common_prefix_length(start_texts[key], full), end)
        spans, unlocated = [], []
        for row, conversation in enumerate(conversations):
            whole, mask, missed = [], None, 0  # whole: spans of messages trained throughout
            for i, message in enumerate(conversation):
                if (row, i) not in found:
                    continue
                start, end = found[row, i]
                overrides = self._overrides(message)
                if end <= start:
                    missed += 1
                elif not overrides:
                    whole.append((start, end))
                else:
                    mask = np.zeros(len(texts[row]), dtype=bool) if mask is None else mask
                    missed += self._mark(mask, texts[row], start, end, message, overrides)
            if mask is not None:
                for start, end in whole:
                    mask[start:end] = True
            spans.append(intervals(mask) if mask is not None else _merged(whole))
            unlocated.append(missed)
        return texts, spans, unlocated

    @staticmethod
    def _plain(message: dict) -> dict:
        """The message as the template sees it: no ftcore flags, content parts joined."""
        plain = {k: v for k, v in message.items() if k not in ("train", "train_reasoning")}
        if isinstance(message.get("content"), list):
            plain["content"] = _flatten_content(message["content"])[0]
        return plain

    def _trained(self, message: dict) -> bool:
        flag = message.get("train")
        return flag if flag is not None else message["role"] in self.train_on

    def _touches_training(self, message: dict) -> bool:
        if self._trained(message) or message.get("train_reasoning"):
            return True
        content = message.get("content")
        return isinstance(content, list) and any(part.get("train") for part in content)

    def _render_requests(self, requests: dict, tools: list) -> dict:
        """Render {(row, i): (messages, generation_prompt)}; an empty prefix renders as ''."""
        out = {key: "" for key, (messages, _) in requests.items() if not messages}
        for flag in (False, True):
            keys = [key for key, (messages, prompt) in requests.items() if messages and prompt is flag]
            rendered, _ = self._render_grouped(
                [requests[k][0] for k in keys], [tools[k[0]] for k in keys], flag
            )
            out.update(zip(keys, rendered, strict=True))
        return out

    def _render_grouped(self, conversations: list, tools: list, generation_prompt: bool, track: bool = False):
        """``render`` for conversations with their own tools (``tools[i]``), one call per tools list."""
        texts: list[str] = [""] * len(conversations)
        blocks: list = [None] * len(conversations)
        groups: dict[int, list[int]] = {}
        for i, row_tools in enumerate(tools):
            groups.setdefault(id(row_tools) if row_tools is not None else 0, []).append(i)
        for members in groups.values():
            rendered, tracked = self.render(
                [conversations[i] for i in members], tools[members[0]], generation_prompt, track
            )
            for i, text, block in zip(members, rendered, tracked, strict=True):
                texts[i], blocks[i] = text, block
        return texts, blocks

    def _overrides(self, message: dict) -> list:
        """Parts flagged unlike their message: [(text to find in the message, [(start, end, flag) in it])]."""
        trained = self._trained(message)
        overrides = []
        reasoning = message.get("reasoning_content")
        if reasoning and message.get("train_reasoning", trained) != trained:
            overrides.append((reasoning, [(0, len(reasoning), message["train_reasoning"])]))
        text, parts = _flatten_content(message.get("content"))
        if any(flag is not None and flag != trained for _, _, flag in parts):
            overrides.append((text, parts))
        return overrides

    def _mark(self, mask: np.ndarray, full: str, start: int, end: int, message: dict, overrides: list) -> int:
        """Mark the message's trained characters in ``mask``; return how many parts were not found."""
        mask[start:end] = self._trained(message)
        missed, cursor = 0, start
        for searched, parts in overrides:
            found = full.find(searched, cursor, end) if searched else -1
            if found < 0:
                missed += 1
                if any(flag is False for _, _, flag in parts):
                    mask[start:end] = False  # cannot exclude the untrained part: train nothing of the message
                continue
            for part_start, part_end, flag in parts:
                if flag is not None:
                    mask[found + part_start : found + part_end] = flag
            cursor = found + len(searched)
        return missed


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans, touching or overlapping ones joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]))
        else:
            out.append((start, end))
    return out


def intervals(mask: np.ndarray) -> np.ndarray:
    """The runs of True in a boolean mask, as an (n, 2) array of [start, end) pairs."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return edges.reshape(-1, 2)


def _first_token_from(encoding, position: int, limit: int) -> int | None:
    """The first token that starts at or after character ``position`` (and before ``limit``)."""
    char = position
    while char < limit:
        token = encoding.char_to_token(char)
        if token is None:
            char += 1
            continue
        start, end = encoding.token_to_chars(token)
        if start >= position:
            return token
        char = end  # this token starts before position: look after it
    return None


def token_labels(encoding, spans, text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of one encoded text: a token is trained when every character it covers is in a span."""
    ids = np.asarray(encoding.ids, dtype=np.int32)
    labels = np.full(len(ids), IGNORE, dtype=np.int32)
    for start, end in spans:
        first = _first_token_from(encoding, start, end)
        if first is None:
            continue
        stop = _first_token_from(encoding, end, text_length)
        stop = len(ids) if stop is None else stop
        while stop > first:  # drop tokens running past the span, and zero-width (special) tokens
            chars = encoding.token_to_chars(stop - 1)
            if chars is not None and chars[1] <= end and chars[1] > chars[0]:
                break
            stop -= 1
        labels[first:stop] = ids[first:stop]
    return ids, labels


class SpecialTokenText:
    """The tokenizer's special tokens (``<|im_start|>``, ``</s>``...) spelled out in row text.

    ``split`` puts back, in an encoding, the tokens of that text in place of the special token the
    tokenizer made of it: a row can then neither forge a chat-template turn nor train an
    end-of-sequence token it only spells.
    """

    def __init__(self, tokenizer):
        specials = {
            t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special and t.content
        }
        by_length = sorted(specials, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, by_length))) if specials else None
        self.ids = np.asarray(sorted(specials.values()), np.int32)
        self.as_text = {}  # special token id -> the tokens of its text as plain text in the middle of a row
        backend, plain = tokenizer.backend_tokenizer, None
        for text, i in specials.items():
            ids = [token.id for token in backend.model.tokenize(text)]  # no prefix space, no special tokens
            if tokenizer.decode(ids) != text:  # a vocabulary of mapped bytes, and text beyond ASCII
                if plain is None:
                    from tokenizers import Tokenizer as Backend

                    plain = Backend.from_str(backend.to_str())
                    plain.encode_special_tokens = True
                ids = plain.encode(text, add_special_tokens=False).ids
            self.as_text[i] = np.asarray(ids, np.int32)

    def count(self, value: Any) -> int:
        """Special-token texts in every string inside ``value`` (a text, a conversation...)."""
        if self.pattern is None:
            return 0
        return sum(len(self.pattern.findall(text)) for text in _strings(value))

    def starts(self, text: str) -> list[int]:
        return [match.start() for match in self.pattern.finditer(text)] if self.pattern else []

    def neutral(self, value: Any) -> Any:
        """``value`` with the first character of each special-token text replaced by ``NEUTRAL``."""
        if isinstance(value, str):
            return self.pattern.sub(lambda match: NEUTRAL + match.group()[1:], value)
        if isinstance(value, dict):
            return {key: self.neutral(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.neutral(item) for item in value]
        return value

    def from_row(self, text: str, neutral: str) -> list[int] | None:
        """Starts of the special-token texts in rendered ``text`` that came from the row, not the chat
        template: those ``neutral`` (the same render with the row's text ``neutral``-ised) has changed;
        None when the template moved characters (it rewrites special-token text)."""
        if len(neutral) != len(text):
            return None
        return [start for start in self.starts(text) if neutral[start] == NEUTRAL]

    def split(self, encoding, ids: np.ndarray, labels: np.ndarray, starts: list[int]):
        """``ids``/``labels`` with each special token that begins at a character in ``starts`` replaced
        by the tokens of its text, trained as it was."""
        starts, out_ids, out_labels, last = set(starts), [], [], 0
        for token in np.flatnonzero(np.isin(ids, self.ids)):
            chars = encoding.token_to_chars(int(token))
            if chars is None or chars[0] not in starts:
                continue
            text_ids = self.as_text[int(ids[token])]
            out_ids += [ids[last:token], text_ids]
            out_labels += [
                labels[last:token],
                text_ids if labels[token] != IGNORE else np.full_like(text_ids, IGNORE),
            ]
            last = token + 1
        if not last:
            return ids, labels
        return np.concatenate([*out_ids, ids[last:]]), np.concatenate([*out_labels, labels[last:]])


def encode(
    tokenizer, value: str | list[dict], *, split_special_tokens: bool = True, add_generation_prompt: bool = False,
    tools: list | None = None, template_kwargs: dict[str, Any] | None = None,
    special_text: SpecialTokenText | None = None,
) -> list[int]:  # fmt: skip
    """Token ids of a text (with the tokenizer's own special tokens, such as BOS) or of a conversation
    rendered by the chat template, as ``tokenizer(text)`` and ``apply_chat_template`` make them, except
    that with ``split_special_tokens`` special tokens spelled out in the text or messages are plain text,
    as in SFT data; the template's own stay special. ``special_text``: a ``SpecialTokenText(tokenizer)``
    to reuse across calls."""
    special_text = (special_text or SpecialTokenText(tokenizer)) if split_special_tokens else None
    starts: list[int] | None = []
    if isinstance(value, str):
        text = value
        starts = special_text.starts(text) if special_text else []
    else:
        masker = ChatMasker(tokenizer, [], template_kwargs)
        text = masker.render([value], tools, add_generation_prompt)[0][0]
        if special_text and special_text.count([value, tools]):
            neutral = masker.render(
                [special_text.neutral(value)], special_text.neutral(tools), add_generation_prompt
            )[0][0]
            starts = special_text.from_row(text, neutral)
            if starts is None:
                raise DataError(REWRITTEN)
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=isinstance(value, str))
    ids = np.asarray(encoding.ids, np.int32)
    if starts:
        ids = special_text.split(encoding, ids, ids, starts)[0]
    return ids.tolist()


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


class Tokenizer:
    """Batched ``datasets.map`` function: canonical rows -> input_ids, labels, _status, _row, and the
    counts _unlocated and _special (special-token texts in the row)."""

    def __init__(self, tokenizer, schema: str, *, sequence_len: int, excess_length: str, on_bad_rows: str,
                 label: str, train_on: list[str], template_kwargs: dict[str, Any] | None = None,
                 split_special_tokens: bool = True):  # fmt: skip
        self.tokenizer, self.schema, self.label = tokenizer, schema, label
        self.sequence_len, self.excess_length, self.on_bad_rows = sequence_len, excess_length, on_bad_rows
        self.warned = 0
        self.masker = ChatMasker(tokenizer, train_on, template_kwargs) if schema == "messages" else None
        self.eos = tokenizer.eos_token_id
        self.special_text, self.split_special_tokens = SpecialTokenText(tokenizer), split_special_tokens

    def __call__(self, batch: dict[str, list]):
        records = batch["_row"]
        unlocated, failed, specials, split_at = [0] * len(records), set(), [0] * len(records), None
        if self.schema == "tokens":
            encoded = [
                (np.asarray(i, np.int32), np.asarray(lab, np.int32))
                for i, lab in zip(batch["input_ids"], batch["labels"], strict=True)
            ]
        elif self.schema == "messages":
            texts, spans, unlocated, failed = self._render(batch)
            specials = [
                self.special_text.count([m, t])
                for m, t in zip(batch["messages"], batch["tools"], strict=True)
            ]
            if self.split_special_tokens and any(specials):
                split_at = self._content_starts(batch, texts, specials, failed)
            encoded = self._encode(texts, spans, special_tokens=False, eos=False, split_at=split_at)
        else:
            if self.schema == "text":
                texts = batch["text"]
                spans = [[(0, len(t))] for t in texts]
            else:
                texts = [p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)]
                spans = [[(len(p), len(t))] for t, p in zip(texts, batch["prompt"], strict=True)]
            split_at = [self.special_text.starts(text) for text in texts]
            specials = [len(starts) for starts in split_at]
            split_at = split_at if self.split_special_tokens else None
            encoded = self._encode(texts, spans, special_tokens=True, eos=True, split_at=split_at)
        ids_out, labels_out, status_out, rows_out, unlocated_out, specials_out = [], [], [], [], [], []
        for j, ((ids, labels), record, missed) in enumerate(zip(encoded, records, unlocated, strict=True)):
            fitted = [(ids, labels, SKIPPED)] if j in failed else self._fit(ids, labels, record)
            for part, (ids_part, labels_part, status) in enumerate(fitted):
                if status in (OK, TRUNCATED):
                    labels_part[0] = IGNORE  # never predicted (no context), nor across packed sequences
                    if not (labels_part != IGNORE).any():
                        status, ids_part, labels_part = UNTRAINED, ids_part[:0], labels_part[:0]
                ids_out.append(ids_part)
                labels_out.append(labels_part)
                status_out.append(status)
                rows_out.append(record)
                unlocated_out.append(missed)
                specials_out.append(0 if part else specials[j])  # a row split in windows counts once
        return _arrow_batch(ids_out, labels_out, status_out, rows_out, unlocated_out, specials_out)

    def _content_starts(
        self, batch: dict[str, list], texts: list[str], specials: list[int], failed: set[int]
    ):
        """Where each rendered text has special-token text that came from the row, not from the chat
        template: the rows are rendered again with that text neutralised, which moves no character."""
        rows = [j for j, count in enumerate(specials) if count and j not in failed]
        neutral = self.masker.render_rows(
            [self.special_text.neutral(batch["messages"][j]) for j in rows],
            [self.special_text.neutral(batch["tools"][j]) for j in rows],
        )
        split_at: list[list[int]] = [[] for _ in texts]
        for j, other in zip(rows, neutral, strict=True):
            starts = self.special_text.from_row(texts[j], other)
            if starts is None:
                self._bad_row(j, batch["_row"][j], failed, REWRITTEN)
                continue
            split_at[j] = starts
        return split_at

    def _bad_row(self, j: int, record: int, failed: set[int], problem: str) -> None:
        """Raise a DataError naming the row, or (``on_bad_rows = "skip"``) mark it skipped and log it."""
        from ftcore.data.sources import line_number

        if self.on_bad_rows == "raise":
            raise DataError(
                f'{problem}; fix the row or set on_bad_rows = "skip"',
                file=self.label,
                row=line_number(self.label, record),
            )
        self.warned += 1
        if self.warned <= WARN_ROWS:
            log.warning("%s, row %d: skipped: %s", self.label, line_number(self.label, record), problem)
        failed.add(j)

    def _encode(self, texts: list[str], spans: list, *, special_tokens: bool, eos: bool, split_at=None):
        """[(input_ids, labels)] with the fast tokenizer (one batched call; offsets read only at span edges);
        ``split_at[i]``: where text ``i`` has special-token text to keep as plain text."""
        encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=special_tokens)
        out = []
        for i, (encoding, text, text_spans) in enumerate(zip(encodings, texts, spans, strict=True)):
            ids, labels = token_labels(encoding, text_spans, len(text))
            if split_at and split_at[i]:
                ids, labels = self.special_text.split(encoding, ids, labels, split_at[i])
            if eos and (not len(ids) or ids[-1] != self.eos):
                ids, labels = (
                    np.append(ids, self.eos).astype(np.int32),
                    np.append(labels, self.eos).astype(np.int32),
                )
            out.append((ids, labels))
        return out

    def _fit(self, ids: np.ndarray, labels: np.ndarray, record: int):
        """[(ids, labels, status)] for one row under ``excess_length``."""
        limit = self.sequence_len
        if len(ids) <= limit:
            return [(ids, labels, OK)]
        if self.excess_length == "split":
            return [(ids[i : i + limit], labels[i : i + limit], OK) for i in range(0, len(ids), limit)]
        if self.excess_length == "truncate":
            return [(ids[:limit], labels[:limit], TRUNCATED)]
        if self.excess_length == "drop":
            return [(ids[:0], labels[:0], TOO_LONG)]
        from ftcore.data.sources import line_number

        raise DataError(
            f'{len(ids)} tokens, more than train.sequence_len = {limit}; set excess_length = "truncate" or '
            '"drop" for this dataset, or raise train.sequence_len',
            file=self.label,
            row=line_number(self.label, record),
        )

    def _render(self, batch: dict[str, list]):
        """Render a batch; when the template fails, render row by row to name (or skip) the bad rows."""
        try:
            return (*self.masker(batch["messages"], batch["tools"]), set())
        except Exception:  # noqa: BLE001 - the row-by-row pass below names the error and the row
            pass
        texts, spans, unlocated, failed = [], [], [], set()
        for j, (conversation, tools, record) in enumerate(
            zip(batch["messages"], batch["tools"], batch["_row"], strict=True)
        ):
            try:
                text, span, missed = self.masker([conversation], [tools])
            except Exception as exc:  # noqa: BLE001 - templates raise anything; report it as a bad row
                problem = f"the chat template cannot render this conversation: {type(exc).__name__}: {exc}"
                self._bad_row(j, record, failed, problem)
                text, span, missed = [""], [np.zeros((0, 2), dtype=np.int64)], [0]
            texts += text
            spans += span
            unlocated += missed
        return texts, spans, unlocated, failed


def _arrow_batch(
    ids: list[np.ndarray], labels: list[np.ndarray], status: list[int], rows: list[int], unlocated: list[int],
    specials: list[int],
):  # fmt: skip
    """The tokenized batch as an Arrow table (much cheaper for ``datasets`` to write than Python lists)."""
    import pyarrow as pa

    offsets = pa.array(np.concatenate(([0], np.cumsum([len(i) for i in ids]))).astype(np.int32))

    def lists(parts: list[np.ndarray]):
        values = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    return pa.table({
        "input_ids": lists(ids), "labels": lists(labels), "_status": pa.array(status, pa.int8()),
        "_row": pa.array(rows, pa.int64()), "_unlocated": pa.array(unlocated, pa.int16()),
        "_special": pa.array(specials, pa.int32()),
    })  # fmt: skip
