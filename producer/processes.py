"""The processes a demo starts, and the promise to stop every one of them.

Each child runs in a session of its own, so a worker's pool processes are
stopped with it; children are stopped by pid (never by name), on success,
failure or Ctrl-C.
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

__all__ = ["Children"]


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]


@dataclass
class Children:
    """Start children with ``start``; ``stop_all`` (or leaving the ``with``) ends them."""

    log_dir: Path
    children: list[_Child] = field(default_factory=list)

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                list(args), env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.children.append(_Child(name, process))
        return process.pid

    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for c in self.children}

    def dead(self) -> list[tuple[str, int]]:
        """(name, exit code) of children that have exited."""
        return [(c.name, code) for c in self.children if (code := c.process.poll()) is not None]

    def stop_all(self, timeout: float = 15.0) -> int:
        """SIGTERM every child's process group, wait, then SIGKILL; how many were stopped."""
        alive = [c for c in self.children if c.process.poll() is None]
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(max(0.1, deadline - time.monotonic()))
            # Whatever is left of the group (a pool child that ignored TERM).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
        stopped = len(alive)
        self.children.clear()
        return stopped

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
