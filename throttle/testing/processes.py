"""Child processes in sessions of their own, and the promise to stop every one of them.

Each child runs in a session (process group) of its own, so a Celery worker's
pool processes are stopped with it; children are stopped by pid (never by
name), on success, failure or Ctrl-C.  Used by the demo, the fleet tests and
the embedded servers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["Children", "Closing", "spawn", "stop_groups"]


class Closing:
    """A context manager that starts on entry and closes on exit, whatever happened."""

    def start(self) -> Self:
        return self

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def spawn(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` in a session of its own, output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(args), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip


def stop_groups(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 15.0) -> int:
    """SIGTERM each process's group, wait up to ``timeout``, then SIGKILL what is left.

    A warm shutdown first (a Celery worker puts its held messages back), then
    the whole group (a pool child that ignored TERM).  How many were running.
    """
    alive = [p for p in processes if p.poll() is None]
    for proc in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return len(alive)


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]


@dataclass
class Children(Closing):
    """Start children with ``spawn``; ``close`` (or leaving the ``with``) stops them all."""

    log_dir: Path
    children: list[_Child] = field(default_factory=list)

    def spawn(self, name: str, args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> int:
        """Start child ``name`` (log: ``<log_dir>/<name>.log``); its pid."""
        process = spawn(args, env, self.log_dir / f"{name}.log", cwd)
        self.children.append(_Child(name, process))
        return process.pid

    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for c in self.children}

    def dead(self) -> list[tuple[str, int]]:
        """(name, exit code) of children that have exited."""
        return [(c.name, code) for c in self.children if (code := c.process.poll()) is not None]

    def stop_all(self, timeout: float = 15.0) -> int:
        """Stop every child's process group (see ``stop_groups``); how many were running."""
        stopped = stop_groups([c.process for c in self.children], timeout)
        self.children.clear()
        return stopped

    def close(self) -> None:
        self.stop_all()
