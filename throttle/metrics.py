"""Per-limit counters of the gate's decisions, kept in Redis.

Each worker process counts its gate's decisions in memory and adds them to
Redis once a second (one pipelined HINCRBY per changed field): the gate
itself stays at one round trip per task, and every process of the fleet adds
into the same hash, ``<prefix>:~metrics:{<limit>}`` (``keys.metrics_key``).
``throttle metrics --port N`` serves them for Prometheus
(``throttle.prometheus``), with each limit's configuration and tokens.

Fields of a limit's hash:

- ``admitted:now`` / ``admitted:booked``: bodies that ran, paying at once or
  at a slot booked earlier;
- ``deferred:<reason>``: re-sent with a countdown (reasons: empty, early,
  late, paused, changed, rate_limited, backend);
- ``paused``: pauses after a body raised ``RateLimited``;
- ``backend_errors:<policy>``: Redis could not answer;
- ``shadow_refused``: a shadow-mode limit would have deferred the task;
- ``wait:<le>``, ``wait_sum``, ``wait_count``: how long admitted tasks had
  waited since they first met the gate (a histogram, seconds).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import RedisError

from .keys import metrics_key

__all__ = ["MetricsRecorder", "read_metrics", "summarise", "WAIT_BUCKETS"]

logger = logging.getLogger("throttle")

#: Upper bounds (seconds) of the wait histogram's buckets; +Inf is implied.
WAIT_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

#: Metrics keys expire a week after their last change.
TTL_S = 7 * 86400


class MetricsRecorder:
    """In-process counters, flushed to Redis by a daemon thread every ``interval``."""

    def __init__(self, redis: Any, prefix: str, interval: float = 1.0) -> None:
        self.redis = redis
        self.prefix = prefix
        self.interval = interval
        self._counts: Counter[tuple[str, str]] = Counter()
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pid = 0
        self._stop = threading.Event()

    def _ensure_thread(self) -> None:
        # One flusher per process: a forked pool child starts its own.
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        thread = threading.Thread(target=self._run, name="throttle-metrics", daemon=True)
        thread.start()
        atexit.register(self.flush)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def count(self, limits: Iterable[str], field: str, n: int = 1) -> None:
        self._ensure_thread()
        with self._lock:
            for limit in limits:
                self._counts[(limit, field)] += n

    def wait(self, limits: Iterable[str], seconds: float) -> None:
        """An admitted task had waited ``seconds`` since it first met the gate."""
        self._ensure_thread()
        le = next((b for b in WAIT_BUCKETS if seconds <= b), None)
        bucket = "wait:+Inf" if le is None else f"wait:{le:g}"
        with self._lock:
            for limit in limits:
                self._counts[(limit, bucket)] += 1
                self._counts[(limit, "wait_count")] += 1
                self._sums[limit] = self._sums.get(limit, 0.0) + seconds

    def flush(self) -> None:
        with self._lock:
            counts, sums = self._counts, self._sums
            self._counts, self._sums = Counter(), {}
        if not counts and not sums:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            touched = set()
            for (limit, field), n in counts.items():
                pipe.hincrby(metrics_key(self.prefix, limit), field, n)
                touched.add(limit)
            for limit, total in sums.items():
                pipe.hincrbyfloat(metrics_key(self.prefix, limit), "wait_sum", total)
                touched.add(limit)
            for limit in touched:
                pipe.expire(metrics_key(self.prefix, limit), TTL_S)
            pipe.execute()
        except RedisError as exc:  # Redis down: keep the counts for the next try
            logger.debug("throttle metrics not flushed: %s", exc)
            with self._lock:
                self._counts.update(counts)
                for limit, total in sums.items():
                    self._sums[limit] = self._sums.get(limit, 0.0) + total


def read_metrics(redis: Any, prefix: str, limits: Iterable[str]) -> dict[str, dict[str, float]]:
    """The counters of ``limits``, as numbers, in one round trip."""
    names = list(limits)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(metrics_key(prefix, name))
    out: dict[str, dict[str, float]] = {}
    for name, raw in zip(names, pipe.execute(), strict=True):
        out[name] = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in (raw or {}).items()}
    return out


def _total(fields: Mapping[str, float], head: str) -> float:
    return sum(v for k, v in fields.items() if k == head or k.startswith(head + ":"))


def summarise(fields: Mapping[str, float]) -> dict[str, float]:
    """admitted, deferred, shadow_refused, paused, parked, duplicates, backend_errors, wait of one limit."""
    return {
        "admitted": _total(fields, "admitted"),
        "deferred": _total(fields, "deferred"),
        "shadow_refused": fields.get("shadow_refused", 0.0),
        "paused": fields.get("paused", 0.0),
        "parked": fields.get("parked", 0.0),
        "released": fields.get("released", 0.0),
        "duplicates": fields.get("duplicates", 0.0),
        "backend_errors": _total(fields, "backend_errors"),
        "wait_sum": fields.get("wait_sum", 0.0),
        "wait_count": fields.get("wait_count", 0.0),
    }
