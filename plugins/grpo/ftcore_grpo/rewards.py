"""The built-in rewards of the grpo plugin, registered in ftcore's reward registry.

A reward is ``fn(completions, **kwargs) -> list[float | None]``: ``completions`` are the texts
(one per sample); the keywords are the dataset's columns (one value per sample), ``prompts``,
``completion_ids`` (token ids per sample), ``max_completion_length``, and the reward's own
``[grpo.reward_kwargs]``. Accept ``**kwargs`` for what you do not use. ``None`` leaves a sample
out of that reward. Nothing here imports torch.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """The number in ``text`` ("1,234", "$5", "-0.5"), or None."""
    match = _NUMBER.search(str(text).replace("$", ""))
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The answer a text gives: the number after its last "####", else its last number."""
    text = str(text)
    if "####" in text:
        return parse_number(text.rsplit("####", 1)[1])
    numbers = _NUMBER.findall(text.replace("$", ""))
    return parse_number(numbers[-1]) if numbers else None


def gsm8k_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's final number equals the answer's (gsm8k "#### 72", or a bare number)."""
    scores = []
    for text, expected in zip(completions, answer, strict=True):
        got, want = final_number(text), final_number(expected)
        scores.append(float(got is not None and want is not None and abs(got - want) < 1e-6))
    return scores


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces kept), or None."""
    start = str(text).rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for index in range(begin, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            if depth == 0:
                return text[begin:index]
            depth -= 1
    return None


def _normal(text: str) -> str:
    text = re.sub(r"\\(?:left|right|!|,|;|\s)", "", str(text))
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "")
    return re.sub(r"\s+", "", text).rstrip(".")


def _as_number(text: str) -> float | None:
    try:
        return float(_normal(text).replace(",", ""))
    except ValueError:
        return None


def boxed_accuracy(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's last ``\\boxed{}`` matches the answer (as numbers, or as normalised text).

    The answer may itself hold a ``\\boxed{}``, a gsm8k "#### 72" tail, or be the bare answer.
    """
    scores = []
    for text, expected in zip(completions, answer, strict=True):
        got, expected = last_boxed(text), str(expected)
        want = last_boxed(expected)
        if want is None:
            want = expected.rsplit("####", 1)[1] if "####" in expected else expected
        if got is None:
            scores.append(0.0)
            continue
        got_number, want_number = _as_number(got), _as_number(want)
        if got_number is not None and want_number is not None:
            scores.append(float(abs(got_number - want_number) < 1e-6))
        else:
            scores.append(float(_normal(got) == _normal(want)))
    return scores


def regex_format(
    completions, pattern: str = r"^<think>.*?</think>\s*<answer>.*?</answer>$", **kwargs
) -> list[float]:
    """1.0 when the whole completion (stripped) matches ``pattern`` (dot matches newlines)."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(str(text).strip()) is not None) for text in completions]


def length_penalty(
    completions, completion_ids=None, max_completion_length=None, max_length=None, buffer=None, **kwargs
) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to ``max_length - buffer`` tokens, then linearly down to -1 at ``max_length``.

    ``max_length`` defaults to ``[grpo] max_completion_length``; ``buffer`` to a quarter of it.
    """
    limit = int(max_length or max_completion_length or 0)
    if limit <= 0:
        raise ValueError("length_penalty needs max_length (or max_completion_length)")
    zone = int(buffer if buffer is not None else max(limit // 4, 1))
    lengths = (
        [len(ids) for ids in completion_ids] if completion_ids is not None else [len(t) for t in completions]
    )
    return [max(-1.0, min(0.0, (limit - zone - length) / zone)) for length in lengths]
