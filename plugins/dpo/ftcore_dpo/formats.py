"""Preference row formats: ``preference`` (prompt/chosen/rejected) and ``hh_rlhf`` transcripts.

Both produce canonical ``preference`` rows: ``prompt``, ``chosen`` and ``rejected`` are either all
strings, or all message lists (the prompt's messages, then each completion's messages), plus
``tools`` (tool schemas or None). Nothing here imports torch or trl.
"""

from __future__ import annotations

import json
from typing import Any

from ftcore.data.formats import FormatOptions, RowFormat, normalize_messages
from pydantic import Field

COMPLETION_ROLES = ("assistant", "tool")


class PreferenceOptions(FormatOptions):
    role_map: dict[str, str] = Field(default_factory=dict, description='Rename roles, e.g. {human = "user"}.')


class Preference(RowFormat):
    """``prompt``, ``chosen``, ``rejected`` as strings or message lists; optional ``system`` and ``tools``.

    Without a ``prompt`` column, message-list pairs share their leading messages as the prompt.
    A string completion beside a message-list prompt becomes one assistant message.
    """

    schema = "preference"
    fields = ("chosen", "rejected")
    optional_fields = ("prompt", "system", "tools")
    Options = PreferenceOptions

    def convert(self, row):
        chosen, rejected = (self._side(row[key], key) for key in ("chosen", "rejected"))
        prompt = row.get("prompt")
        if prompt is None:
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
        elif isinstance(prompt, str) and not isinstance(chosen, str):
            raise ValueError(
                "prompt is a string but chosen/rejected are message lists: give the prompt as messages too"
            )
        elif not isinstance(prompt, str):
            prompt = normalize_messages(prompt, self.options.role_map)
            chosen, rejected = (_as_messages(side) for side in (chosen, rejected))
        if isinstance(prompt, str) != isinstance(chosen, str) or isinstance(chosen, str) != isinstance(
            rejected, str
        ):
            raise ValueError("chosen and rejected must both be strings or both be message lists")
        if row.get("system"):
            if isinstance(prompt, str):
                raise ValueError(
                    "a system column needs message-list prompts; put the system text into the prompt"
                )
            prompt = [{"role": "system", "content": row["system"]}, *prompt]
        if isinstance(chosen, list):
            for side, messages in (("chosen", chosen), ("rejected", rejected)):
                _check_completion(messages, side)
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": _tools(row.get("tools"))}

    def _side(self, value: Any, key: str):
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(f"{key} is empty")
            return value
        if isinstance(value, dict):
            value = [value]
        return normalize_messages(value, self.options.role_map)


def _tools(value: Any) -> list[dict] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"tools is not valid JSON: {exc}") from None
    if value is not None and not (isinstance(value, list) and all(isinstance(tool, dict) for tool in value)):
        raise ValueError("tools must be a list of tool schemas (objects)")
    return value or None


def _as_messages(side):
    return [{"role": "assistant", "content": side}] if isinstance(side, str) else side


def _split_shared_prompt(chosen, rejected):
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise ValueError(
            "no prompt: give a prompt column (strings), or message lists that share their first messages"
        )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while (
        shared and chosen[shared - 1]["role"] in COMPLETION_ROLES
    ):  # a completion starts after the last user turn
        shared -= 1
    if shared == 0:
        raise ValueError("no prompt: chosen and rejected share no leading user turn; add a prompt column")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_completion(messages: list[dict], side: str) -> None:
    if not messages:
        raise ValueError(f"{side} has no messages after the prompt")
    roles = {m["role"] for m in messages}
    if not roles <= set(COMPLETION_ROLES) or messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{side} must hold assistant (and tool) messages and end with an assistant message, got roles "
            f"{[m['role'] for m in messages]}"
        )


HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class HHRLHFOptions(FormatOptions):
    messages: bool = Field(
        False,
        description="Give user/assistant message lists (for a chat template) instead of the transcript text.",
    )


class HHRLHF(RowFormat):
    """Anthropic HH-RLHF transcripts: ``chosen`` and ``rejected`` are "\\n\\nHuman: ... \\n\\nAssistant: ..." texts.

    The prompt is the shared text up to and including the last "\\n\\nAssistant:"; the completions
    are what follows it in each transcript.
    """

    schema = "preference"
    fields = ("chosen", "rejected")
    Options = HHRLHFOptions

    def convert(self, row):
        chosen, rejected = row["chosen"], row["rejected"]
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(text, str) or ASSISTANT not in text:
                raise ValueError(f"{key} is not a Human/Assistant transcript (no {ASSISTANT.strip()!r} turn)")
        cut = chosen.rindex(ASSISTANT) + len(ASSISTANT)
        prompt = chosen[:cut]
        if not rejected.startswith(prompt):
            raise ValueError(
                "rejected does not continue the conversation of chosen (their text before the last Assistant turn differs)"
            )
        chosen, rejected = (
            chosen[cut:],
            rejected[cut:],
        )  # may be empty: saying nothing can be the preferred reply
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same")
        if self.options.messages:
            reply = [{"role": "assistant", "content": text.strip()} for text in (chosen, rejected)]
            return {
                "prompt": transcript_messages(prompt),
                "chosen": reply[:1],
                "rejected": reply[1:],
                "tools": None,
            }
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": None}


def transcript_messages(prompt: str) -> list[dict[str, str]]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:" -> user/assistant messages (a, b, c)."""
    messages = []
    rest = prompt
    while rest:
        marker = HUMAN if rest.startswith(HUMAN) else ASSISTANT if rest.startswith(ASSISTANT) else None
        if marker is None:
            raise ValueError(f"the transcript has text outside Human/Assistant turns: {rest[:40]!r}")
        rest = rest[len(marker) :]
        ends = [i for i in (rest.find(HUMAN), rest.find(ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(rest)
        content, rest = rest[:end].strip(), rest[end:]
        if content:
            messages.append({"role": "user" if marker == HUMAN else "assistant", "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the prompt must end with a Human turn before the last Assistant turn")
    return messages
