"""``auto_start``: run Gym's ``ng_run`` for the length of a training run.

``ng_run`` (from the bin/ folder of ``[nemo_gym] python``) starts in ``gym_dir`` with the
``config_paths``, the head port and ``overrides``, in its own process group, logging to
``output_dir/nemo-gym.log``. ftcore waits until the head server serves its global config and every
server answers, and stops it (SIGINT: ng_run stops its servers and Ray; then SIGKILL) at the end of
the run or when it fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from ftcore_nemo_gym.client import GymError, ServerDown, discover, wait_until_up


class GymLauncher:
    """One ``ng_run`` process; ``start()`` returns the head URL once every server answers."""

    def __init__(self, section, log_path: Path):
        self.section, self.log_path = section, Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.section.head_port}"

    def command(self) -> list[str]:
        gym = self.section
        ng_run = Path(gym.python).parent / "ng_run"
        return [
            str(ng_run),
            f"+config_paths=[{','.join(gym.config_paths)}]",
            f"+head_server.port={gym.head_port}",
            "+head_server.host=127.0.0.1",
            "+skip_venv_if_present=true",
            *gym.overrides,
        ]

    def start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.section.gym_dir, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.time() + self.section.start_timeout
        try:
            while True:
                try:
                    servers = discover(self.url, timeout=5)
                    break
                except GymError:
                    if not self.alive() or time.time() > deadline:
                        raise ServerDown(self.failure("its head server did not answer")) from None
                    time.sleep(1)
            wait_until_up(servers, deadline, alive=self.alive)
        except ServerDown as exc:
            message = self.failure(str(exc))
            self.stop()
            raise ServerDown(message) from None
        return self.url

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self, what: str) -> str:
        tail = self.log_path.read_text(errors="replace").splitlines()[-10:] if self.log_path.exists() else []
        state = "running" if self.alive() else f"exited with {self.process.returncode}"
        return f"ng_run ({state}, head {self.url}): {what}. Log {self.log_path}, its end:\n" + "\n".join(tail)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGINT)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            os.killpg(self.process.pid, signal.SIGKILL)  # what is left of its group
        self.process.wait()
        self.process = None
