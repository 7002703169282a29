"""Starting and stopping the system's processes: worker, beat, and friends.

Used by ``make run`` and the end-to-end tests, so both start workers the way
users do (``celery -A workers worker``) and stop exactly what they started,
by PID, process group and all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from channels_core.names import ALL_QUEUES

__all__ = ["Process", "start_worker", "start_beat", "celery_command", "worker_args", "beat_args"]


def celery_command() -> list[str]:
    """``celery`` from this interpreter's environment."""
    return [sys.executable, "-m", "celery"]


class Process:
    """A child process in its own process group, with its output in a file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            args,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log():
                return
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited ({self.popen.returncode}):\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} did not print {needle!r} in {timeout:g}s:\n{self.log()[-3000:]}"
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker and its pool children)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL after ``timeout``."""
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait(10)
        else:
            # Reap pool children left behind if the main process was killed alone.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()
        return self.popen.returncode


def worker_args(
    name: str,
    *,
    concurrency: int = 2,
    queues: Sequence[str] = ALL_QUEUES,
    extra: Sequence[str] = (),
) -> list[str]:
    """``celery -A workers worker`` as users start it, with a unique node name."""
    return [
        *celery_command(),
        "-A",
        "workers",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h",
        "-Q",
        ",".join(queues),
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]


def beat_args(schedule: Path) -> list[str]:
    """``celery -A workers beat`` with its schedule file and no pidfile."""
    return [
        *celery_command(),
        "-A",
        "workers",
        "beat",
        "--loglevel",
        "INFO",
        "--schedule",
        str(schedule),
        "--pidfile",
        "",
    ]


def start_worker(
    env: Mapping[str, str],
    log_path: Path,
    *,
    concurrency: int = 2,
    name: str = "worker",
    queues: tuple[str, ...] = ALL_QUEUES,
    wait: bool = True,
) -> Process:
    process = Process(
        name, worker_args(name, concurrency=concurrency, queues=queues), env, log_path
    )
    if wait:
        process.wait_for_log("ready.")
    return process


def start_beat(
    env: Mapping[str, str], log_path: Path, schedule: Path, *, wait: bool = True
) -> Process:
    process = Process("beat", beat_args(schedule), env, log_path)
    if wait:
        process.wait_for_log("beat: Starting")
    return process
