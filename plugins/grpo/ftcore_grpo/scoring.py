"""Reward scoring: named reward functions called per prompt group, in this process or in workers.

``RewardScorer.score`` calls every reward on every group of completions. A call that raises
(or, in worker processes, runs past ``timeout``) gives ``None`` for that group's samples under
that reward and is counted in ``Scores.failures``; it never stops training. Worker processes
(``reward_workers = N``) are spawned once, run each call in their own main thread (so rewards
may use ``signal.alarm``), and a worker that hangs is killed and replaced.
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError

log = logging.getLogger("ftcore.grpo")

WORKER_START_TIMEOUT = 300.0
"""Seconds a new worker may take to import the reward modules."""


@dataclass
class Reward:
    """A reward function with its name and its ``[grpo.reward_kwargs]``."""

    name: str
    fn: Callable[..., list]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, completions, **kwargs) -> list:
        return self.fn(completions, **kwargs, **self.kwargs)

    @property
    def __name__(self) -> str:  # how TRL names a reward in its metrics
        return self.name


def resolve_rewards(config, plugins) -> list[Reward]:
    """The config's rewards: registry names, or ``module:function`` (importable, or a module beside the config)."""
    rewards = []
    for name in config.grpo.rewards:
        if ":" in name:
            fn = _import_user_function(name, config)
        else:
            fn = plugins.registry("reward").get(name)
        if not callable(fn):
            raise ConfigError(f"reward {name!r} is not callable ({type(fn).__name__})", key="grpo.rewards")
        rewards.append(Reward(name, fn, dict(config.grpo.reward_kwargs.get(name, {}))))
    return rewards


def _import_user_function(name: str, config) -> Callable:
    module_name, attribute = name.split(":")
    if config.source:  # a rewards.py beside the config file is importable, in workers too
        folder = str(Path(config.source).resolve().parent)
        if folder not in sys.path:
            sys.path.append(folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"cannot import the reward module {module_name!r} ({exc}): put {module_name}.py beside the config "
            "file or install it",
            key="grpo.rewards",
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            f"module {module_name!r} has no function {attribute!r}", key="grpo.rewards"
        ) from None


@dataclass
class Scores:
    """``values[sample][reward]`` (None = no score), failed calls' samples per reward, and the time taken."""

    values: list[list[float | None]]
    failures: dict[str, int]
    seconds: float


def _check(name: str, result: Any, expected: int) -> list[float | None]:
    if not isinstance(result, list | tuple) or len(result) != expected:
        count = len(result) if isinstance(result, list | tuple) else type(result).__name__
        raise ValueError(f"reward {name!r} returned {count} scores for {expected} completions")
    values = []
    for value in result:
        value = None if value is None else float(value)
        values.append(None if value is None or math.isnan(value) else value)
    return values


def _call(reward: Reward, completions: list[str], per_sample: dict[str, list], constants: dict[str, Any]):
    return reward(completions, **per_sample, **constants)


class RewardScorer:
    """Scores completions group by group with ``rewards``; ``workers > 0`` uses that many processes."""

    def __init__(self, rewards: list[Reward], *, workers: int = 0, timeout: float = 60.0):
        self.rewards, self.workers, self.timeout = rewards, workers, timeout
        self._pool: _Pool | None = None
        self._warned: set[str] = set()

    def score(
        self,
        completions: list[str],
        groups: list[tuple[int, int]],
        per_sample: dict[str, list],
        constants: dict[str, Any] | None = None,
    ) -> Scores:
        """Score ``completions``; ``groups`` are (start, end) slices; ``per_sample`` columns are sliced with them."""
        start_time = time.perf_counter()
        constants = constants or {}
        tasks = [
            (
                k,
                start,
                end,
                completions[start:end],
                {key: values[start:end] for key, values in per_sample.items()},
            )
            for k in range(len(self.rewards))
            for start, end in groups
        ]
        if self.workers:
            if self._pool is None:
                self._pool = _Pool(self.rewards, self.workers)
            outcomes = self._pool.run(
                [(k, texts, columns, constants) for k, _, _, texts, columns in tasks], self.timeout
            )
        else:
            outcomes = [self._run_here(k, texts, columns, constants) for k, _, _, texts, columns in tasks]
        values: list[list[float | None]] = [[None] * len(self.rewards) for _ in completions]
        failures = {reward.name: 0 for reward in self.rewards}
        for (k, start, end, _, _), (ok, result) in zip(tasks, outcomes, strict=True):
            name = self.rewards[k].name
            if ok:
                for offset, value in enumerate(_check(name, result, end - start)):
                    values[start + offset][k] = value
            else:
                failures[name] += end - start
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning(
                        "reward %r failed (its samples score None; counted in metrics): %s", name, result
                    )
        return Scores(values, failures, time.perf_counter() - start_time)

    def _run_here(self, k, texts, columns, constants):
        try:
            return True, _call(self.rewards[k], texts, columns, constants)
        except Exception:
            return False, traceback.format_exc(limit=3)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def _serve(conn) -> None:
    """A worker's loop: receive the rewards once, then (index, reward, texts, columns, constants) tasks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    try:
        rewards = pickle.loads(conn.recv_bytes())
    except Exception:
        conn.send(("error", traceback.format_exc(limit=3)))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        k, texts, columns, constants = task
        try:
            conn.send((True, _call(rewards[k], texts, columns, constants)))
        except Exception:
            conn.send((False, traceback.format_exc(limit=3)))


class _Worker:
    def __init__(self, context, payload: bytes):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), daemon=True, name="ftcore-reward-worker")
        self.process.start()
        child.close()
        self.conn.send_bytes(payload)
        if not self.conn.poll(WORKER_START_TIMEOUT):
            self.kill()
            raise RuntimeError(f"a reward worker did not start within {WORKER_START_TIMEOUT:.0f} s")
        kind, detail = self.conn.recv()
        if kind != "ready":
            self.kill()
            raise RuntimeError(f"a reward worker could not load the reward functions:\n{detail}")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


class _Pool:
    """``size`` spawned workers; each task runs on one worker with a deadline."""

    def __init__(self, rewards: list[Reward], size: int):
        try:
            self.payload = pickle.dumps(rewards)
        except Exception as exc:
            raise ConfigError(
                f"reward_workers needs rewards that can be sent to another process ({exc}): define them at "
                "module level",
                key="grpo.reward_workers",
            ) from None
        self.context = multiprocessing.get_context("spawn")
        self.workers = [_Worker(self.context, self.payload) for _ in range(size)]

    def run(self, tasks: list[tuple], timeout: float) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any] | None] = [None] * len(tasks)
        pending = list(range(len(tasks)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (task index, deadline)
        while pending or busy:
            for slot in range(len(self.workers)):
                if slot not in busy and pending:
                    index = pending.pop(0)
                    self.workers[slot].conn.send(tasks[index])
                    busy[slot] = (index, time.monotonic() + timeout)
            wait = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
            ready = multiprocessing.connection.wait([self.workers[slot].conn for slot in busy], timeout=wait)
            for slot, (index, deadline) in list(busy.items()):
                worker = self.workers[slot]
                if worker.conn in ready:
                    try:
                        outcomes[index] = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. a reward called os._exit)
                        outcomes[index] = (
                            False,
                            f"the reward worker exited with code {worker.process.exitcode}",
                        )
                        self._replace(slot)
                    del busy[slot]
                elif time.monotonic() >= deadline:
                    outcomes[index] = (False, f"timed out after {timeout:g} s (reward_timeout)")
                    self._replace(slot)
                    del busy[slot]
        return outcomes  # type: ignore[return-value]

    def _replace(self, slot: int) -> None:
        self.workers[slot].kill()
        self.workers[slot] = _Worker(self.context, self.payload)

    def close(self) -> None:
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
            worker.conn.close()
        self.workers = []
