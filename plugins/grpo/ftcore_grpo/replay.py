"""Replay of informative groups and deferred re-roll of failed prompts.

A group whose completions all scored the same teaches nothing (zero advantages). ``Replay``
keeps the newest groups that did vary (up to ``buffer_size``) and puts them, newest first, in the
place of zero-signal groups of later batches, each once. Prompts whose whole group scored 0 wait
in a queue; once training has done ``reroll_start_fraction`` of its steps, up to
``reroll_max_groups`` of them take the place of the last groups of each new batch (before it is
generated), so that they are tried again with the improved policy; the queue keeps no more than the
batches left can take (the oldest go first). Both are saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

from ftcore_grpo.generation import Completion
from ftcore_grpo.rollout import Rollout


def groups_of(count: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of each group: the sampler puts a prompt's ``size`` samples next to each other
    (two groups of the same prompt may be neighbours, so prompts alone cannot tell them apart)."""
    return [(start, start + size) for start in range(0, count, size)]


def group_totals(rewards: list[list[float | None]], weights: list[float]) -> list[float | None]:
    """Each sample's weighted reward (``None`` scores left out; None when a sample has none)."""
    totals = []
    for sample in rewards:
        present = [w * v for w, v in zip(weights, sample, strict=True) if v is not None]
        totals.append(sum(present) if present else None)
    return totals


class Replay:
    """The replay buffer and the re-roll queue of one training run (one per process)."""

    def __init__(self, buffer_size: int, reroll_start_fraction: float = 1.0, reroll_max_groups: int = 1):
        self.buffer_size, self.reroll_start, self.reroll_max = (
            buffer_size,
            reroll_start_fraction,
            reroll_max_groups,
        )
        self.buffer: deque[dict[str, Any]] = deque(maxlen=buffer_size or None)
        self.rerolls: deque[dict[str, Any]] = deque()

    @property
    def active(self) -> bool:
        return bool(self.buffer_size) or self.reroll_start < 1.0

    def apply(self, rollout: Rollout, weights: list[float], size: int) -> tuple[Rollout, list[bool]]:
        """Zero-signal groups (of ``size`` consecutive samples) replaced from the buffer; which samples
        are replayed. Then this batch's varied groups join the buffer, its all-zero prompts the
        re-roll queue."""
        totals = group_totals(rollout.rewards, weights)
        rows, completions, rewards = list(rollout.rows), list(rollout.completions), list(rollout.rewards)
        replayed = [False] * len(rows)
        fresh = []
        for start, end in groups_of(len(rows), size):
            present = [t for t in totals[start:end] if t is not None]
            varied = len(set(present)) > 1
            if varied:
                fresh.append(self._group(rollout, start, end))
            elif self.buffer:
                group = self.buffer.pop()
                rows[start:end] = group["rows"]
                completions[start:end] = [Completion(**c) for c in group["completions"]]
                rewards[start:end] = group["rewards"]
                replayed[start:end] = [True] * (end - start)
            if present and not any(present) and self.reroll_start < 1.0:
                self.rerolls.append(rollout.rows[start])
        if self.buffer_size:
            self.buffer.extend(fresh)
        return dataclasses.replace(rollout, rows=rows, completions=completions, rewards=rewards), replayed

    @staticmethod
    def _group(rollout: Rollout, start: int, end: int) -> dict[str, Any]:
        return {
            "rows": rollout.rows[start:end],
            "completions": [dataclasses.asdict(c) for c in rollout.completions[start:end]],
            "rewards": rollout.rewards[start:end],
        }

    def bound_rerolls(self, batches: int) -> None:
        """Drop the oldest queued prompts beyond what ``batches`` more batches can re-roll."""
        for _ in range(len(self.rerolls) - self.reroll_max * batches):
            self.rerolls.popleft()

    def reroll(self, rows: list[dict[str, Any]], progress: float, size: int) -> list[dict[str, Any]]:
        """``rows`` with its last groups' prompts replaced by queued failed prompts, once ``progress``
        (the share of training done) reaches ``reroll_start_fraction``."""
        count = min(self.reroll_max, len(self.rerolls))
        if progress < self.reroll_start or not count:
            return rows
        rows = list(rows)
        for start, end in groups_of(len(rows), size)[-count:]:
            rows[start:end] = [self.rerolls.popleft()] * (end - start)
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer), "rerolls": list(self.rerolls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer.extend(state.get("buffer", []))
        self.rerolls.extend(state.get("rerolls", []))
