"""Async prefetch: a background thread generates and scores the next batches while this one trains.

The trainer's data loader hands over a batch only when it is due, so ``RolloutPlan`` replays the
same seeded sampler to know the prompts of rollout r ahead of time; when the trainer reaches
rollout r, the prefetched rollout is used only if its prompts are the ones the loader gave (else
it is produced again, synchronously, with a warning). One worker thread runs the producer:
rollouts r+1 .. r+k (``prefetch_depth``) are queued when rollout r is taken, so with weights
synced at each step they lag by up to k steps. ``prefetch_depth = 0`` still generates in the
thread, but only the rollout about to train (no staleness).

Under several processes only rank 0 generates, the whole generation batch, and the rollout is
broadcast from the training thread (no collectives in the worker), each rank keeping its slice.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ftcore_grpo.rollout import Rollout, RolloutProducer, prompt_groups

log = logging.getLogger("ftcore.grpo")


class RolloutPlan:
    """The prompt rows of every rollout, in the order of a TRL ``RepeatSampler`` (a fresh copy of it).

    The sampler yields each generation batch ``repeat_count`` times in a row; rollout r is the r-th
    distinct batch, over as many epochs as it takes (a new permutation per epoch, as the loader's).
    """

    def __init__(self, dataset, sampler, batch_size: int):
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self._batches: list[list[int]] = []
        self._indices = self._iterate()

    def _iterate(self):
        block = self.batch_size * self.sampler.repeat_count
        while True:
            epoch, batches = iter(self.sampler), 0
            while len(chunk := list(itertools.islice(epoch, block))) == block:
                batches += 1
                yield chunk[: self.batch_size]
            if not batches:  # fewer prompts than one batch
                return

    def rows(self, index: int) -> list[dict[str, Any]] | None:
        while len(self._batches) <= index:
            batch = next(self._indices, None)
            if batch is None:
                return None
            self._batches.append(batch)
        return [self.dataset[i] for i in self._batches[index]]


def slice_rollout(rollout: Rollout, start: int, end: int, *, keep_failures: bool) -> Rollout:
    """The samples ``start:end`` of a rollout (one process's share of a broadcast rollout)."""
    rows = rollout.rows[start:end]
    return Rollout(
        index=rollout.index,
        rows=rows,
        completions=rollout.completions[start:end],
        rewards=rollout.rewards[start:end],
        failures=rollout.failures if keep_failures else dict.fromkeys(rollout.failures, 0),
        groups=prompt_groups(rows),
        generation_seconds=rollout.generation_seconds,
        scoring_seconds=rollout.scoring_seconds,
    )


class AsyncRollouts:
    """Runs ``producer.produce`` for rollouts ahead of the trainer in one background thread."""

    def __init__(
        self,
        producer: RolloutProducer,
        plan: RolloutPlan,
        *,
        depth: int,
        process_index: int = 0,
        num_processes: int = 1,
        broadcast: Callable[[list], None] | None = None,
        prepare: Callable[[list[dict], int], list[dict]] | None = None,
    ):
        self.producer, self.plan, self.depth = producer, plan, depth
        self.prepare = prepare or (lambda rows, index: rows)
        self.process_index, self.num_processes, self.broadcast = process_index, num_processes, broadcast
        self.generating = process_index == 0
        self._worker = (
            ThreadPoolExecutor(1, thread_name_prefix="ftcore-grpo-rollouts") if self.generating else None
        )
        self._pending: dict[int, tuple[list[dict], Future]] = {}

    def _submit(self, index: int) -> None:
        if index in self._pending:
            return
        rows = self.plan.rows(index)
        if rows is not None:
            future = self._worker.submit(self.producer.produce, self.prepare(rows, index), index)
            self._pending[index] = (rows, future)

    def take(self, index: int, local_rows: list[dict[str, Any]]) -> Rollout:
        """Rollout ``index`` for this process's ``local_rows`` (after ``prepare``, which may re-roll
        prompts); then queue the next ``depth`` rollouts."""
        rollout = self._take_global(index, local_rows) if self.generating else None
        if self.num_processes > 1:
            shared = [rollout]
            self.broadcast(shared)  # on the training thread: every rank calls it here
            rollout = shared[0]
            size = len(local_rows)
            start = self.process_index * size
            rollout = slice_rollout(rollout, start, start + size, keep_failures=self.process_index == 0)
        return rollout

    def _take_global(self, index: int, local_rows: list[dict[str, Any]]) -> Rollout:
        for stale in [i for i in self._pending if i < index]:
            self._pending.pop(stale)[1].cancel()
        self._submit(index)
        rows, future = self._pending.pop(index, (None, None))
        expected = [row["prompt_ids"] for row in local_rows]
        if rows is None or [row["prompt_ids"] for row in rows[: len(local_rows)]] != expected:
            if rows is not None:
                log.warning(
                    "grpo: the prompts of rollout %d differ from the planned ones; generating it again", index
                )
            self.cancel()
            if self.num_processes > 1:
                raise RuntimeError("grpo: async_prefetch lost track of the prompt order across processes")
            prepared = self.prepare(local_rows, index)
            rows, future = local_rows, self._worker.submit(self.producer.produce, prepared, index)
        rollout = future.result()
        for ahead in range(index + 1, index + 1 + self.depth):
            self._submit(ahead)
        return rollout

    def call(self, fn, *args):
        """``fn(*args)`` on the generating thread (after what it is doing), or here on other ranks."""
        return self._worker.submit(fn, *args).result() if self.generating else fn(*args)

    def cancel(self) -> None:
        """Drop the queued rollouts (one already generating finishes first)."""
        for _, future in self._pending.values():
            future.cancel()
        for _, future in self._pending.values():
            if not future.cancelled():
                future.exception()  # wait: nothing may generate once this returns
        self._pending.clear()

    def close(self) -> None:
        if self._worker is not None:
            self.cancel()
            self._worker.shutdown(wait=True)
