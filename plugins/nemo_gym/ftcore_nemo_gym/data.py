"""The ``nemo_gym`` dataset format: Gym task rows -> ``prompt_only`` rows that keep the task.

A Gym task has ``responses_create_params`` (``input``: a string or messages; ``tools``; sampling
keys), an optional ``agent_ref`` and verifier fields at the top level (``expected_answer``, ...).
A string ``input`` is the prompt as it is (a base model's text prompt); a message list becomes chat
messages (``developer`` -> ``system``, ``input_text`` parts joined) for the chat template. The
whole task is kept as JSON in ``nemo_gym_task`` (for ``/verify`` and ``/run``) and its agent in
``nemo_gym_agent`` (``agent_ref.name``, else ``options.agent``; "" = the ``[nemo_gym] agent``).
"""

from __future__ import annotations

import json

from ftcore.data.formats import FormatOptions, RowFormat
from pydantic import Field

VERIFIER_FIELDS = (
    "agent_ref",
    "expected_answer",
    "extraction_mode",
    "case_sensitive",
    "expected_count",
    "initial_count",
    "question",
    "answer",
    "metadata",
    "options",
    "instruction_id_list",
    "kwargs",
)
"""Top-level task fields kept without configuration (Gym's example servers read these)."""

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class NemoGymOptions(FormatOptions):
    agent: str | None = Field(
        None,
        description="The Gym agent of this dataset's rows without agent_ref (default: [nemo_gym] agent).",
    )
    columns: list[str] = Field(
        default_factory=list,
        description="More top-level task fields the environment's /verify reads (beside the common ones: "
        + ", ".join(VERIFIER_FIELDS)
        + ").",
    )


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and "text" in p for p in content):
        return "".join(str(part["text"]) for part in content)
    raise ValueError(f"{where}: content must be a string or a list of input_text parts")


def prompt_of(params: dict) -> str | list[dict]:
    """The prompt of ``responses_create_params.input``: its text, or its chat messages."""
    given = params.get("input")
    if isinstance(given, str) and given.strip():
        return given
    if not isinstance(given, list) or not given:
        raise ValueError("responses_create_params.input must be a non-empty string or list of messages")
    messages = []
    for i, item in enumerate(given):
        where = f"responses_create_params.input[{i}]"
        if not isinstance(item, dict) or item.get("role") not in ROLES:
            raise ValueError(f"{where}: a message with role system, developer, user or assistant")
        messages.append({"role": ROLES[item["role"]], "content": _text(item.get("content"), where)})
    if messages[-1]["role"] == "assistant":
        raise ValueError("the prompt ends with an assistant message; the model answers after the prompt")
    return messages


class NemoGymTasks(RowFormat):
    """Gym task rows (JSONL as Gym's ``data/*.jsonl``) for grpo with ``[nemo_gym]``."""

    schema = "prompt_only"
    fields = ("responses_create_params",)
    optional_fields = VERIFIER_FIELDS
    Options = NemoGymOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.optional_fields = (*VERIFIER_FIELDS, *self.options.columns)

    def convert(self, row):
        params = row["responses_create_params"]
        if not isinstance(params, dict):
            raise ValueError("responses_create_params must be an object")
        task = {key: value for key, value in row.items() if value is not None}
        agent = row.get("agent_ref") or {}
        if not isinstance(agent, dict) or not isinstance(agent.get("name", ""), str):
            raise ValueError('agent_ref must be {"type": "responses_api_agents", "name": AGENT}')
        return {
            "prompt": prompt_of(params),
            "nemo_gym_task": json.dumps(task, ensure_ascii=False, sort_keys=True),
            "nemo_gym_agent": agent.get("name") or self.options.agent or "",
        }
