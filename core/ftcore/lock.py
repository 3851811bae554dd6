"""One run per output_dir: an OS lock on ``output_dir/.ftcore.lock``, held for the whole run.

The lock is ``flock`` on the file, so the kernel releases it when the holder dies (even by
SIGKILL) and a leftover file never blocks a later run; the file names the holder (pid and host).
Taking it is also the check that output_dir is a writable folder, before anything heavy loads.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ftcore.errors import ConfigError

LOCK_FILE = ".ftcore.lock"
_held: dict[Path, int] = {}  # lock file -> how many nested holders in this process


def run_lock(config):
    """The lock this process takes for its run: the ``--nproc`` launcher (its workers inherit its
    claim), or rank 0 of a job started by torchrun itself; other processes take none."""
    launched = os.environ.get("FTCORE_LAUNCHED")
    if launched or int(os.environ.get("RANK", "0")) > 0 or config.distributed.node_rank > 0:
        return nullcontext()
    return output_dir_lock(config.train.output_dir, source=config.source)


@contextmanager
def output_dir_lock(output_dir: str | Path, source: str | None = None):
    """Hold the lock of ``output_dir`` (created if missing); nested holds in one process share it."""
    output_dir = Path(output_dir)
    path = output_dir.absolute() / LOCK_FILE
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    handle = _acquire(output_dir, path, source)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        os.close(handle)  # releases the lock


def _acquire(output_dir: Path, path: Path, source: str | None) -> int:
    def refuse(message: str) -> ConfigError:
        return ConfigError(message, file=source, key="train.output_dir")

    if output_dir.exists() and not output_dir.is_dir():
        raise refuse(f"{output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise refuse(f"cannot write to {output_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        os.close(handle)
        raise refuse(
            f"{output_dir} is in use by another ftcore run ({holder}); wait for it to end or stop it, "
            "or choose another output_dir"
        ) from None
    except OSError as exc:  # a filesystem without locks: run, but say that nothing guards the folder
        print(f"ftcore: cannot lock {path} ({exc.strerror}); make sure no other run uses this output_dir")
        return handle
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return handle


def _holder(handle: int) -> str:
    """What the lock file says about its holder (which writes it just after taking the lock)."""
    for _ in range(20):
        text = os.pread(handle, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "a process that has not said which"
