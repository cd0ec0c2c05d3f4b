"""The worker side of a deferred task's ETA: read on Redis' clock, not the host's.

A deferred task carries a Celery ETA, which the worker that fetches it
compares with its *own* clock.  When hosts' clocks disagree (by seconds, on a
fleet without NTP), a task deferred on one host and fetched by another
arrives early or late by the difference: early costs a hop, late costs its
slot (it books again), and a fleet with skewed hosts can spend most of its
time bouncing tasks between them.

So the gate also writes the arrival time in Redis time (``throttle_eta``),
and ``ThrottleRequest`` (the worker's request class for throttled tasks)
turns it into this host's time with this host's measured offset to Redis.
Without a measured offset (Redis unreachable so far), Celery's own ETA
stands.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime
from typing import Any

from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery import Celery
from celery.worker.request import Request
from redis.exceptions import RedisError

from ..connect import client_from_url
from .deferral import EVENT_DEFERRED, HEADER_ETA, Deferred
from .settings import settings_for

__all__ = ["ThrottleRequest", "ClockOffset", "clock_offset"]

logger = logging.getLogger("throttle")

#: A body killed by its hard time limit gets SIGTERM, then SIGKILL 0.1 s
#: later (billiard): its leases are released this long after the timeout.
_KILL_SETTLE_S = 0.5

#: How often a worker measures its clock against Redis' (a drifting clock
#: moves milliseconds a minute; a stepped one is caught within this).
_REFRESH_S = 10.0

#: Round trips per measurement; the one with the shortest round trip is kept
#: (as NTP does).  One sample's error is up to half its round trip: the
#: first one also waits for the connection to be set up, and on a loaded
#: worker a reply can wait for the GIL or the CPU for tens of milliseconds.
#: A single sample put tasks' arrivals 50 ms and more before their slots
#: (seen in CI: 38 of 243 deferrals came back early) for 10 s at a time.
_SAMPLES = 5


class ClockOffset:
    """Redis time minus this host's time, measured now and then in the background."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._client: Any = None
        self.value: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def measure(self) -> float | None:
        """One measurement (the shortest of ``_SAMPLES`` round trips); the last known offset if Redis cannot answer."""
        try:
            if self._client is None:
                settings = settings_for(self._app)
                self._client = client_from_url(settings.redis_url, **settings.redis_options)
            best: tuple[float, float] | None = None  # (round trip, offset)
            for _ in range(_SAMPLES):
                before = time.time()
                seconds, micros = self._client.time()
                after = time.time()
                sample = (after - before, int(seconds) + int(micros) / 1e6 - (before + after) / 2)
                if best is None or sample[0] < best[0]:
                    best = sample
        except (RedisError, OSError, ValueError) as exc:
            logger.debug("cannot measure this host's clock against Redis: %s", exc)
            return self.value
        assert best is not None
        self.value = best[1]
        return self.value

    def get(self) -> float | None:
        """The offset (first call measures it; a daemon thread keeps it fresh)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self.measure()
                    self._thread = threading.Thread(target=self._run, name="throttle-clock", daemon=True)
                    self._thread.start()
        return self.value

    def _run(self) -> None:
        stop = threading.Event()  # never set: Event.wait works where time.sleep may not (libfaketime)
        while True:
            stop.wait(_REFRESH_S)
            self.measure()


_offsets: dict[tuple[int, int], ClockOffset] = {}
_offsets_lock = threading.Lock()


def clock_offset(app: Celery) -> float | None:
    """This process's offset to the Redis clock of ``app``'s buckets, in seconds (None: not known)."""
    ident = (id(app), os.getpid())
    found = _offsets.get(ident)
    if found is None:
        with _offsets_lock:
            found = _offsets.setdefault(ident, ClockOffset(app))
    return found.get()


class ThrottleRequest(Request):  # type: ignore[misc]
    """Celery's request, with the ETA of a throttle deferral read on Redis' clock,
    and a ``task-deferred`` event for each deferral.

    The event is sent here, in the worker's main process, with the worker's
    own event dispatcher: only when the worker sends task events at all, and
    on the connection Celery already keeps for them (a pool child would
    open one per event).
    """

    def _send_deferred_event(self, fields: dict[str, Any]) -> None:
        """Send ``task-deferred``, never into a buffer another thread clears.

        On the main thread (prefork, solo) it joins the worker's buffered task
        events like Celery's own.  On a threads-pool thread it is published at
        once, under the dispatcher's lock: before Celery 5.7 the dispatcher
        appended to its event buffer without the lock while the main thread's
        flush published the buffer and then emptied it, so an event appended
        during that write was lost (seen: 7 deferrals, 6 events, celery 5.3).
        Its order among the run's buffered events does not matter to
        ``celery.events.state``: DEFERRED ranks above RECEIVED and STARTED.
        """
        eventer = self._eventer
        if threading.current_thread() is threading.main_thread():
            self.send_event(EVENT_DEFERRED, **fields)
        elif eventer is not None and eventer.enabled and self.task.send_events:
            eventer.publish(EVENT_DEFERRED, {"uuid": self.id, **fields}, eventer.producer)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # a prefork child's exception comes wrapped (ExceptionWithTraceback)
        if isinstance(exc, Deferred):
            # Without this event, monitors keep the task STARTED for its
            # whole wait: Celery sends nothing after an Ignore.
            self._send_deferred_event(exc.fields())
        elif isinstance(exc, (WorkerLostError, Terminated)):
            # The pool process died (killed, revoked with terminate): its
            # task_postrun never ran, so its leases are given back from here
            # (before a reject re-queues the task).
            self._release_leases()
        elif isinstance(exc, TimeLimitExceeded):
            self._release_leases(after=_KILL_SETTLE_S)
        return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> Any:
        if not soft:
            # The pool kills the process: nothing in it releases.  Billiard
            # reports the timeout first, then sends SIGTERM and, 0.1 s later,
            # SIGKILL: released once the body cannot be running any more, so
            # the next task never overlaps it.
            self._release_leases(after=_KILL_SETTLE_S)
        return super().on_timeout(soft, timeout)

    def _release_leases(self, after: float = 0.0) -> None:
        if getattr(self.task, "_throttle_plan", None) is None or not self.task._throttle_plan.leases:
            return
        if after > 0:
            timer = threading.Timer(after, self._release_leases)
            timer.daemon = True
            timer.start()
            return
        try:
            args, kwargs = self.args, self.kwargs
        except Exception:  # a body that does not decode: release what needs no tenant
            args, kwargs = (), {}
        from .leases import release_task  # the gate's modules, only when a lease is involved

        try:
            release_task(self._app, self.task, self.id, args, kwargs)
        except Exception as exc:  # never fail the worker's bookkeeping: the leases expire
            logger.warning("could not release the leases of %s: %s", self.id, exc)

    @property
    def eta(self) -> datetime | None:
        eta: datetime | None = self._eta
        target = self._request_dict.get(HEADER_ETA)
        if eta is None or target is None:
            return eta
        try:
            redis_time = float(target)
        except (TypeError, ValueError):
            return eta  # a header is input: Celery's ETA stands
        offset = clock_offset(self._app)
        if offset is None:
            return eta
        return datetime.fromtimestamp(redis_time - offset, tz=UTC)
