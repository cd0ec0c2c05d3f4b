"""The gate's decisions, recorded from its signals, for tests to assert on.

``throttle.celery.signals`` are sent in the process that decided, so this
sees the decisions of workers running in the test's process: Celery's
in-process worker (``celery_worker``, pytest-celery's in-process fixtures)
or a worker started with ``celery.contrib.testing.worker.start_worker``.
Workers in other processes (a prefork pool, a container) decide out of its
sight: count their decisions with the metrics (``throttle.metrics``) instead.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..celery import signals

__all__ = ["Decision", "Decisions", "DecisionKind"]

DecisionKind = Literal["admitted", "deferred", "paused", "backend_error", "shadow_refused"]


@dataclass(frozen=True)
class Decision:
    """One decision of the gate about one delivery of one task."""

    kind: DecisionKind
    task_id: str
    task_name: str
    limits: tuple[str, ...]
    at: float  # time.monotonic() when it was recorded
    reason: str | None = None  # deferred: why ("empty", "early", "late", "paused", "rate_limited", ...)
    wait: float | None = None  # deferred: seconds until the task runs or looks again
    paid: str | None = None  # admitted: "now" (tokens taken) or "booked" (a slot booked earlier)
    parked: bool = False  # deferred: into the waiting room instead of a countdown
    seconds: float | None = None  # paused: for how long (a RateLimited's retry_after)


class Decisions:
    """Every decision made in this process while connected (``with`` or ``connect``/``disconnect``)."""

    def __init__(self) -> None:
        self._items: list[Decision] = []
        self._changed = threading.Condition()
        self._receivers: list[tuple[Any, Callable[..., None]]] = []

    # Recording -------------------------------------------------------------

    def connect(self) -> Decisions:
        def on(kind: DecisionKind) -> Callable[..., None]:
            def receive(sender: Any = None, task_id: str = "", limits: Any = (), **fields: Any) -> None:
                decision = Decision(
                    kind=kind,
                    task_id=task_id,
                    task_name=getattr(sender, "name", "") or "",
                    limits=tuple(limits or ()),
                    at=time.monotonic(),
                    reason=fields.get("reason"),
                    wait=fields.get("wait"),
                    paid=fields.get("paid"),
                    parked=bool(fields.get("parked", False)),
                    seconds=fields.get("seconds"),
                )
                with self._changed:
                    self._items.append(decision)
                    self._changed.notify_all()

            return receive

        for signal, kind in (
            (signals.task_admitted, "admitted"),
            (signals.task_deferred, "deferred"),
            (signals.limit_paused, "paused"),
            (signals.backend_error, "backend_error"),
            (signals.shadow_refused, "shadow_refused"),
        ):
            receiver = on(kind)  # type: ignore[arg-type]
            signal.connect(receiver, weak=False)
            self._receivers.append((signal, receiver))
        return self

    def disconnect(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()

    def __enter__(self) -> Decisions:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def clear(self) -> None:
        with self._changed:
            self._items.clear()

    # Reading ---------------------------------------------------------------

    @property
    def all(self) -> list[Decision]:
        with self._changed:
            return list(self._items)

    def of(self, kind: DecisionKind, task_id: str | None = None, task: str | None = None) -> list[Decision]:
        """Decisions of one kind, of one task id and/or one task name."""
        return [
            d
            for d in self.all
            if d.kind == kind and (task_id is None or d.task_id == task_id) and (task is None or d.task_name == task)
        ]

    def admitted(self, task_id: str | None = None, task: str | None = None) -> list[Decision]:
        return self.of("admitted", task_id, task)

    def deferred(
        self, task_id: str | None = None, task: str | None = None, reason: str | None = None
    ) -> list[Decision]:
        return [d for d in self.of("deferred", task_id, task) if reason is None or d.reason == reason]

    # Asserting -------------------------------------------------------------

    def wait_for(self, done: Callable[[Decisions], bool], timeout: float = 10.0, what: str = "") -> list[Decision]:
        """Wait until ``done(self)``; AssertionError with what was seen after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n  ".join(repr(d) for d in self._items[-20:]) or "nothing"
                    raise AssertionError(f"not seen within {timeout:g}s: {what or done}; last decisions:\n  {seen}")
                self._changed.wait(min(left, 0.1))
            return list(self._items)

    def assert_admitted(self, task_id: str, timeout: float = 10.0) -> Decision:
        """The gate let ``task_id`` run (waits up to ``timeout`` for it)."""
        self.wait_for(lambda d: bool(d.admitted(task_id)), timeout, f"task {task_id} admitted")
        return self.admitted(task_id)[-1]

    def assert_deferred(self, task_id: str, reason: str | None = None, timeout: float = 10.0) -> Decision:
        """The gate deferred ``task_id`` (for ``reason``, if given; waits up to ``timeout``)."""
        what = f"task {task_id} deferred" + (f" ({reason})" if reason else "")
        self.wait_for(lambda d: bool(d.deferred(task_id, reason=reason)), timeout, what)
        return self.deferred(task_id, reason=reason)[-1]

    def assert_not_deferred(self, task_id: str | None = None, task: str | None = None) -> None:
        """No deferral so far (of ``task_id`` / ``task``, if given)."""
        found = self.deferred(task_id, task)
        assert not found, f"deferred {len(found)} times: {found[:5]}"
