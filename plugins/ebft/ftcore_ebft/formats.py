"""Row formats of the ebft method (through the format registry; no torch, no tokenizer).

Structured mode reads ``prompt_only`` rows with a ``ground_truth`` column; strided mode
``prompt_completion`` rows (the strided trainer tokenizes them and keeps the prompt length).
"""

from __future__ import annotations

from typing import Literal

from ftcore.data.formats import FormatOptions, RowFormat, normalize_messages
from pydantic import Field, field_validator


def _string(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return value


def _content_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(part.get("text", "") for part in content)
    return _string(content, f"the {message['role']} message's content")


class PromptOptions(FormatOptions):
    chat: bool = Field(
        False, description="Wrap the prompt as a user message (rendered with the chat template)."
    )


class OpenCode(RowFormat):
    """``{input, output}`` rows -> ``prompt`` (input) and ``ground_truth`` (output)."""

    schema = "prompt_only"
    fields = ("input", "output")
    Options = PromptOptions

    def convert(self, row):
        prompt = _string(row["input"], "input")
        if self.options.chat:
            prompt = [{"role": "user", "content": prompt}]
        return {"prompt": prompt, "ground_truth": _string(row["output"], "output")}


class ChatOptions(FormatOptions):
    target: Literal["first", "last", "every"] = Field(
        "last",
        description="Which assistant turn is the reference: the first, the last, or every one (one row per "
        "assistant turn, the messages before it as the prompt).",
    )
    multi_turn: bool = Field(
        False,
        description='With target = "first": keep the later messages (remaining_turns), so structured mode '
        "rolls out the whole conversation turn by turn.",
    )

    @field_validator("multi_turn")
    @classmethod
    def _from_the_first_turn(cls, value, info):
        if value and info.data.get("target") != "first":
            raise ValueError(
                'multi_turn = true rolls out from the first assistant turn: set target = "first"'
            )
        return value


class Chat(RowFormat):
    """Conversations: an assistant turn is the ``ground_truth``, the messages before it the prompt
    (``target = "every"``: one row per assistant turn). ``multi_turn``: ``remaining_turns`` holds the
    messages after the first assistant turn, up to the last assistant turn (contents as text)."""

    schema = "prompt_only"
    fields = ("messages",)
    Options = ChatOptions

    def convert(self, row):
        messages = normalize_messages(row["messages"])
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise ValueError("the conversation has no assistant turn to use as the reference")
        target = self.options.target
        if target == "every":
            if not (turns := [i for i in turns if i > 0]):
                raise ValueError("the only assistant turn has no messages before it")
            return [self.example(messages, i) for i in turns]
        example = self.example(messages, turns[0] if target == "first" else turns[-1])
        if self.options.multi_turn:
            later = messages[turns[0] + 1 : turns[-1] + 1]
            example["remaining_turns"] = [{**m, "content": _content_text(m)} for m in later]
        return example

    @staticmethod
    def example(messages: list[dict], index: int) -> dict:
        if index == 0:
            raise ValueError("the reference assistant turn has no messages before it")
        return {"prompt": messages[:index], "ground_truth": _content_text(messages[index])}


class ReasoningOptions(PromptOptions):
    think_open: str = Field("<think>", description="Tag that opens a reasoning trace.")
    think_close: str = Field("</think>", description="Tag that closes it.")


class Reasoning(RowFormat):
    """``{prompt, response}`` rows with a ``<think>`` trace (inside ``response`` or in ``thinking``) ->
    ``prompt`` and ``ground_truth`` = the trace and the answer."""

    schema = "prompt_only"
    fields = ("prompt", "response")
    optional_fields = ("thinking",)
    Options = ReasoningOptions

    def convert(self, row):
        o = self.options
        prompt = _string(row["prompt"], "prompt")
        response = _string(row["response"], "response")
        thinking = row.get("thinking")
        if thinking is not None:
            if o.think_open in response:
                raise ValueError(f"both thinking and a {o.think_open} trace in response: give one")
            response = f"{o.think_open}\n{_string(thinking, 'thinking').strip()}\n{o.think_close}\n\n{response.lstrip()}"
        if response.count(o.think_open) != 1 or response.count(o.think_close) != 1:
            raise ValueError(f"response must hold one {o.think_open}...{o.think_close} trace")
        if response.index(o.think_open) > response.index(o.think_close):
            raise ValueError(f"{o.think_close} comes before {o.think_open}")
        return {
            "prompt": [{"role": "user", "content": prompt}] if o.chat else prompt,
            "ground_truth": response,
        }


class Strided(RowFormat):
    """Unstructured text for strided mode: ``text`` (no prompt), ``{input, output}``, or ``messages``
    (the last assistant turn is the completion; earlier turns become ``role: content`` lines)."""

    schema = "prompt_completion"
    optional_fields = ("text", "input", "output", "messages")

    def convert(self, row):
        if row.get("text") is not None:
            return {"prompt": "", "completion": _string(row["text"], "text")}
        if row.get("messages") is not None:
            messages = normalize_messages(row["messages"])
            if messages[-1]["role"] != "assistant":
                raise ValueError("the conversation must end with an assistant turn (the completion)")
            prompt = "".join(f"{m['role']}: {_content_text(m)}\n" for m in messages[:-1]) + "assistant:"
            return {"prompt": prompt, "completion": " " + _content_text(messages[-1]).strip()}
        if row.get("output") is not None:
            return {"prompt": row.get("input") or "", "completion": _string(row["output"], "output")}
        raise ValueError("a row needs text, messages, or input and output")
