"""The rollout producer: prompt rows in, generated and scored completions out.

``RolloutProducer.produce(rows, index)`` is everything that happens between the data and the
loss: one ``generate`` call (n completions per prompt group) and one scoring pass, or, with
``streaming_groups``, one of each per chunk of groups, scoring overlapping generation. It touches no
trainer state, so the async trainer can run it for the next batch in a background thread while
the current one trains; ``index`` (the rollout's position in the run) seeds its sampling, so a
resumed run draws the same random numbers for the same rollout.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from ftcore_grpo.generation import Completion, Generator, SamplingParams
from ftcore_grpo.scoring import RewardScorer

ROW_KEYS = ("prompt", "prompt_ids", "_row")
"""Columns of a prompt row that are not handed to rewards as dataset columns."""


@dataclass
class Rollout:
    """One generation batch: per sample (prompt groups consecutive), what was sampled and scored."""

    index: int
    rows: list[dict[str, Any]]
    completions: list[Completion]
    rewards: list[list[float | None]]
    """``rewards[sample][reward]``, ``None`` where a reward gave no score."""
    failures: dict[str, int]
    groups: list[tuple[int, int]]
    generation_seconds: float
    scoring_seconds: float


def prompt_groups(rows: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(start, end) runs of consecutive rows of one prompt (the sampler repeats each prompt G times)."""
    groups, start = [], 0
    for index in range(1, len(rows) + 1):
        if index == len(rows) or rows[index]["prompt_ids"] != rows[start]["prompt_ids"]:
            groups.append((start, index))
            start = index
    return groups


def rollout_seed(seed: int, index: int, rank: int = 0) -> int:
    """The sampling seed of rollout ``index`` of a run seeded ``seed`` (on process ``rank``)."""
    return random.Random(f"grpo-{seed}-{index}-{rank}").getrandbits(31)


class RolloutProducer:
    """Generates ``n`` completions per prompt group with ``generator`` and scores them with ``scorer``.

    ``streaming_groups = k``: generate k prompt groups at a time and score each chunk (in a helper
    thread) while the next one generates; chunk c samples with seed + c. Rewards then run in that
    thread, or in the reward workers.
    """

    def __init__(
        self,
        generator: Generator,
        scorer: RewardScorer,
        sampling: SamplingParams,
        *,
        seed: int,
        rank: int = 0,
        streaming_groups: int = 0,
    ):
        self.generator, self.scorer, self.sampling = generator, scorer, sampling
        self.seed, self.rank, self.streaming_groups = seed, rank, streaming_groups

    def produce(self, rows: list[dict[str, Any]], index: int) -> Rollout:
        groups = prompt_groups(rows)
        seed = rollout_seed(self.seed, index, self.rank)
        per_chunk = self.streaming_groups or len(groups)
        chunks = [groups[i : i + per_chunk] for i in range(0, len(groups), per_chunk)]
        started = time.perf_counter()
        with ThreadPoolExecutor(1, thread_name_prefix="ftcore-grpo-scoring") as scoring:
            scored = []
            for c, chunk in enumerate(chunks):
                generated = self._generate(rows, chunk, seed + c)
                chunk_rows = rows[chunk[0][0] : chunk[-1][1]]
                if len(chunks) == 1:  # nothing to overlap: score on this thread
                    generation_seconds = time.perf_counter() - started
                    scored.append((generated, self._score(chunk_rows, generated)))
                else:
                    scored.append((generated, scoring.submit(self._score, chunk_rows, generated)))
            if len(chunks) > 1:
                generation_seconds = time.perf_counter() - started
                scored = [(generated, future.result()) for generated, future in scored]
        completions, rewards, failures, scoring_seconds = [], [], {}, 0.0
        for generated, scores in scored:
            completions += generated
            rewards += scores.values
            scoring_seconds += scores.seconds
            for name, count in scores.failures.items():
                failures[name] = failures.get(name, 0) + count
        return Rollout(
            index=index,
            rows=rows,
            completions=completions,
            rewards=rewards,
            failures=failures,
            groups=groups,
            generation_seconds=generation_seconds,
            scoring_seconds=scoring_seconds,
        )

    def _generate(
        self, rows: list[dict[str, Any]], groups: list[tuple[int, int]], seed: int
    ) -> list[Completion]:
        sampling = replace(self.sampling, seed=seed)
        sizes = {end - start for start, end in groups}
        if len(sizes) == 1:  # whole groups: one request of n per prompt
            prompts = [rows[start]["prompt_ids"] for start, _ in groups]
            nested = self.generator.generate(prompts, sizes.pop(), sampling)
        else:  # uneven runs (a group split across processes): one completion per row
            chunk = rows[groups[0][0] : groups[-1][1]]
            nested = self.generator.generate([row["prompt_ids"] for row in chunk], 1, sampling)
        return [completion for per_prompt in nested for completion in per_prompt]

    def _score(self, rows: list[dict[str, Any]], completions: list[Completion]):
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ROW_KEYS}
        columns["prompts"] = [row["prompt"] for row in rows]
        columns["completion_ids"] = [c.token_ids for c in completions]
        return self.scorer.score(
            [c.text for c in completions],
            prompt_groups(rows),
            columns,
            {"max_completion_length": self.sampling.max_tokens},
        )

    def close(self) -> None:
        self.scorer.close()
        self.generator.close()
