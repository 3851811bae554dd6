"""Row formats: turn raw rows into canonical rows (the interface and the built-in formats).

Canonical row schemas (DESIGN.md "Data contract"); a format produces exactly one:

- ``messages``: ``messages`` (list of messages) and ``tools`` (list of tool schemas or None), stored
  as JSON (``datasets.Json``). A message has ``role`` (system, user, assistant, tool) and
  ``content`` (a string, a list of ``{"type": "text", "text": ..., "train": bool}`` parts, or None
  beside ``tool_calls``); optional ``train`` (bool; default: its role is in ``data.train_on``),
  ``reasoning_content`` with ``train_reasoning`` (bool; default: the message's train flag),
  ``tool_calls``, ``tool_call_id`` and ``name``.
- ``prompt_completion``: ``prompt`` and ``completion`` (strings; loss on the completion).
- ``text``: ``text`` (a string; loss on every token).
- ``preference``: ``prompt``, ``chosen``, ``rejected``.
- ``prompt_only``: ``prompt`` (a string, or chat messages the model answers) plus reward columns.
- ``tokens``: ``input_ids`` and ``labels`` (-100 = not trained).

Nothing here imports torch, transformers or datasets.
"""

from __future__ import annotations

import json
import random
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ftcore.errors import did_you_mean

SCHEMAS = ("messages", "prompt_completion", "text", "preference", "prompt_only", "tokens")
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {
    "role",
    "content",
    "train",
    "reasoning_content",
    "train_reasoning",
    "tool_calls",
    "tool_call_id",
    "name",
}


class FormatOptions(BaseModel):
    """Base of a format's ``options`` table: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class RowFormat:
    """A named row format, registered with ``register_formats``.

    Subclasses set ``schema`` (the canonical schema produced), ``fields`` (columns read, by
    canonical name; a dataset's ``fields`` table maps them to the file's column names),
    ``optional_fields`` (read when present) and ``Options`` (the pydantic model of the
    dataset's ``options`` table), and implement ``convert``. A generator format sets
    ``needs_path = False`` and implements ``generate`` instead of reading a file.
    ``default_excess_length`` is used when a dataset does not set ``excess_length``.
    """

    schema: ClassVar[str]
    fields: ClassVar[tuple[str, ...]] = ()
    optional_fields: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[FormatOptions]] = FormatOptions
    needs_path: ClassVar[bool] = True
    default_excess_length: ClassVar[str] = "drop"

    def __init__(self, options: dict[str, Any] | FormatOptions | None = None):
        self.options = (
            options if isinstance(options, FormatOptions) else self.Options.model_validate(options or {})
        )

    def convert(self, row: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        """Return the canonical row for ``row`` (keys renamed by the field mapping), or a non-empty
        list of canonical rows when one raw row makes several examples (each is a row of its own).

        Raise ``ValueError`` (or ``TypeError``) with a short reason for a bad row; the caller
        turns it into a ``DataError`` naming the file and row, or skips and counts the row.
        """
        raise NotImplementedError

    def generate(self) -> list[dict[str, Any]]:
        """Raw rows of a generator format (``needs_path = False``)."""
        raise NotImplementedError


def _text(value: Any, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} is empty")
    return value


def _json_value(value: Any, what: str) -> Any:
    """A list/dict as is, or parsed from a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{what} is not valid JSON: {exc}") from None
    return value


def _flag(message: dict, key: str, where: str) -> bool | None:
    value = message.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} must be true or false, got {value!r}")
    return value


def _content(content: Any, where: str) -> str | list[dict[str, Any]] | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"{where}: content must be a string or a list of text parts, got {type(content).__name__}"
        )
    parts = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, dict)
            or part.get("type", "text") != "text"
            or not isinstance(part.get("text"), str)
        ):
            raise ValueError(f'{where}, part {j}: expected {{"type": "text", "text": "..."}}, got {part!r}')
        clean = {"type": "text", "text": part["text"]}
        if (train := _flag(part, "train", f"{where}, part {j}")) is not None:
            clean["train"] = train
        parts.append(clean)
    return parts


def normalize_messages(messages: Any, role_map: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Check a conversation and return clean message dicts (None values dropped, roles mapped)."""
    messages = _json_value(messages, "messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(
            f"messages must be a non-empty list, got {type(messages).__name__ if messages else 'nothing'}"
        )
    role_map = role_map or {}
    clean = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        for alias in ("reasoning", "thinking"):
            if alias in message:
                message.setdefault("reasoning_content", message.pop(alias))
        unknown = set(message) - MESSAGE_KEYS
        if unknown:
            key = sorted(unknown)[0]
            raise ValueError(f"{where}: unknown key {key!r}{did_you_mean(key, MESSAGE_KEYS)}")
        if "role" not in message:
            raise ValueError(f"{where} has no 'role'")
        role = role_map.get(message["role"], message["role"])
        if role not in ROLES:
            hint = (
                f'; map it with options.role_map = {{{message["role"]} = "..."}}'
                if isinstance(role, str)
                else ""
            )
            raise ValueError(
                f"{where}: unknown role {role!r}{did_you_mean(str(role), ROLES)} (expected one of {', '.join(ROLES)}){hint}"
            )
        message["role"] = role
        message["content"] = _content(message.get("content"), where)
        if message["content"] is None and not message.get("tool_calls"):
            raise ValueError(f"{where} ({role}) has no content")
        for key in ("train", "train_reasoning"):
            _flag(message, key, where)
        if "reasoning_content" in message:
            _text(message["reasoning_content"], f"{where}: reasoning_content", allow_empty=True)
        if "tool_calls" in message:
            calls = _json_value(message["tool_calls"], f"{where}: tool_calls")
            if (
                role != "assistant"
                or not isinstance(calls, list)
                or not all(isinstance(c, dict) for c in calls)
            ):
                raise ValueError(f"{where}: tool_calls must be a list of objects on an assistant message")
            message["tool_calls"] = calls
        clean.append(message)
    return clean


def _tools(value: Any) -> list[dict[str, Any]] | None:
    tools = _json_value(value, "tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of tool schemas (objects)")
    return tools or None


class MessagesOptions(FormatOptions):
    role_map: dict[str, str] = Field(
        default_factory=dict, description='Rename roles, e.g. {developer = "system"}.'
    )


class Messages(RowFormat):
    """OpenAI chat rows: ``messages`` (list or JSON string) and optional ``tools``."""

    schema = "messages"
    fields = ("messages",)
    optional_fields = ("tools",)
    Options = MessagesOptions

    def convert(self, row):
        return {
            "messages": normalize_messages(row["messages"], self.options.role_map),
            "tools": _tools(row.get("tools")),
        }


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}


class ShareGPT(RowFormat):
    """ShareGPT rows: ``conversations`` of ``{"from", "value"}`` turns (human/gpt/system/tool)."""

    schema = "messages"
    fields = ("conversations",)
    optional_fields = ("system", "tools")
    Options = MessagesOptions

    def convert(self, row):
        turns = _json_value(row["conversations"], "conversations")
        if not isinstance(turns, list) or not turns:
            raise ValueError("conversations must be a non-empty list of {from, value} turns")
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ValueError(f"turn {i}: expected an object with 'from' and 'value', got {turn!r}")
            message = {"role": turn["from"], "content": turn["value"]}
            if turn.get("train") is not None:
                message["train"] = turn["train"]
            messages.append(message)
        role_map = {**SHAREGPT_ROLES, **self.options.role_map}
        return {"messages": normalize_messages(messages, role_map), "tools": _tools(row.get("tools"))}


class AlpacaOptions(FormatOptions):
    separator: str = Field("\n\n", description="Text between the instruction and a non-empty input.")


class Alpaca(RowFormat):
    """Alpaca rows (``instruction``, optional ``input``, ``output``, optional ``system``) as a chat."""

    schema = "messages"
    fields = ("instruction", "output")
    optional_fields = ("input", "system")
    Options = AlpacaOptions

    def convert(self, row):
        prompt = _text(row["instruction"], "instruction")
        if row.get("input"):
            prompt += self.options.separator + _text(row["input"], "input")
        messages = (
            [{"role": "system", "content": _text(row["system"], "system")}] if row.get("system") else []
        )
        messages += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row["output"], "output")},
        ]
        return {"messages": messages, "tools": None}


class Completion(RowFormat):
    """Raw text for continued pre-training; long texts are split into sequence_len windows."""

    schema = "text"
    fields = ("text",)
    default_excess_length = "split"

    def convert(self, row):
        return {"text": _text(row["text"], "text")}


class PromptCompletion(RowFormat):
    """``prompt`` and ``completion`` strings, joined as plain text; loss on the completion."""

    schema = "prompt_completion"
    fields = ("prompt", "completion")

    def convert(self, row):
        return {
            "prompt": _text(row["prompt"], "prompt", allow_empty=True),
            "completion": _text(row["completion"], "completion"),
        }


class PromptOptions(FormatOptions):
    columns: list[str] = Field(
        default_factory=list,
        description='Columns kept beside the prompt for reward functions, e.g. ["answer"]; required in every row.',
    )


class Prompt(RowFormat):
    """Prompts for online RL: ``prompt`` (a string or chat messages) plus the ``options.columns``.

    The kept columns are fields like ``prompt``: a dataset's ``fields`` table can rename them,
    and a row without one of them is a bad row.
    """

    schema = "prompt_only"
    fields = ("prompt",)
    Options = PromptOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.fields = ("prompt", *self.options.columns)
        self.kind: str | None = None  # "text" or "chat", from the first row: a column holds one kind

    def convert(self, row):
        prompt = row["prompt"]
        kind = "text" if isinstance(prompt, str) else "chat"
        if self.kind not in (None, kind):
            raise ValueError(
                f"prompt is {kind}, but earlier rows hold {self.kind} prompts; use one kind per dataset"
            )
        self.kind = kind
        if kind == "text":
            prompt = _text(prompt, "prompt")
        else:
            prompt = normalize_messages(prompt)
            if prompt[-1]["role"] == "assistant":
                raise ValueError(
                    "the chat prompt ends with an assistant message; the model answers after the prompt"
                )
        return {"prompt": prompt, **{column: row[column] for column in self.options.columns}}


class Pretokenized(RowFormat):
    """``input_ids`` and optional ``labels`` (-100 = not trained; default: train every token)."""

    schema = "tokens"
    fields = ("input_ids",)
    optional_fields = ("labels",)

    def convert(self, row):
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise ValueError("input_ids must be a non-empty list of non-negative integers")
        labels = row.get("labels")
        if labels is None:
            labels = list(ids)
        elif (
            not isinstance(labels, list)
            or len(labels) != len(ids)
            or not all(isinstance(i, int) for i in labels)
        ):
            raise ValueError(f"labels must be a list of {len(ids)} integers (as many as input_ids)")
        return {"input_ids": ids, "labels": labels}


WORDS = (
    "cat dog sun moon tree ball red blue green big small happy sad run jump play sing bird fish cake "
    "milk book park girl boy mom dad home car boat star rain snow hat shoe door box cup bed toy"
).split()


class SyntheticOptions(FormatOptions):
    rows: int = Field(1000, gt=0, description="Number of rows to generate.")
    task: Literal["reverse", "copy", "sort"] = Field(
        "reverse", description="What the completion does to the prompt's words."
    )
    min_words: int = Field(4, gt=0, description="Shortest prompt, in words.")
    max_words: int = Field(32, gt=0, description="Longest prompt, in words.")
    lengths: Literal["uniform", "lognormal"] = Field(
        "uniform", description="Distribution of prompt lengths between min and max."
    )
    seed: int = Field(0, description="Generator seed (rows are the same for the same options).")


class Synthetic(RowFormat):
    """Generated, learnable prompt/completion rows with a controlled length distribution (no file)."""

    schema = "prompt_completion"
    fields = ("prompt", "completion")
    Options = SyntheticOptions
    needs_path = False

    def generate(self):
        o = self.options
        if o.min_words > o.max_words:
            raise ValueError(
                f"options.min_words ({o.min_words}) is larger than options.max_words ({o.max_words})"
            )
        rng = random.Random(o.seed)
        rows = []
        for _ in range(o.rows):
            if o.lengths == "uniform":
                n = rng.randint(o.min_words, o.max_words)
            else:
                median = (o.min_words * o.max_words) ** 0.5
                n = min(o.max_words, max(o.min_words, round(median * rng.lognormvariate(0, 0.5))))
            words = rng.choices(WORDS, k=n)
            answer = {"reverse": words[::-1], "copy": words, "sort": sorted(words)}[o.task]
            rows.append({"prompt": f"{o.task}: {' '.join(words)}\n", "completion": " ".join(answer)})
        return rows

    def convert(self, row):
        return {"prompt": row["prompt"], "completion": row["completion"]}
