"""Per worker process: the Redis client, the live limits, the buckets, the metrics.

A prefork child must not use its parent's sockets, so a runtime belongs to one
(app, pid) and is made on first use, after the fork.  In the threads pool,
every thread of the process shares it; it keeps no per-task state.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from celery import Celery
from redis.exceptions import RedisError

from .._core import unavailable
from ..bucket import MultiBucket, TokenBucket
from ..connect import client_from_url
from ..errors import BackendUnavailable
from ..limit import Limit
from ..live import LiveLimits, LiveState
from ..metrics import MetricsRecorder
from ..room import WaitingRoom
from .options import TaskPlan
from .settings import ThrottleSettings, settings_for

__all__ = ["Runtime", "Effective", "runtime_for"]

logger = logging.getLogger("throttle")

#: More distinct bucket sets than this (many tenants) and the cache starts over.
_MAX_CACHED_BUCKETS = 10_000


@dataclass(frozen=True)
class Effective:
    """A task's limits as the fleet runs them now: live overrides applied."""

    enforce: tuple[tuple[str, Limit], ...]  # (bucket name, limit) decided before the body
    shadow: tuple[tuple[str, Limit], ...]  # (bucket name, limit) only counted
    versions: str  # the enforced limits' versions, e.g. "0,3": a booked slot's stamp
    pause_left: float  # seconds left of an operator's pause (the longest)


class Runtime:
    """One process's connection to the fleet's state in Redis."""

    def __init__(self, settings: ThrottleSettings) -> None:
        self.settings = settings
        self.redis = client_from_url(settings.redis_url, **settings.redis_options)
        self.live = LiveLimits(self.redis, settings.prefix)
        self.metrics = MetricsRecorder(self.redis, settings.prefix) if settings.metrics else None
        self.room = WaitingRoom(self.redis, settings.prefix)
        self._buckets: dict[tuple[tuple[str, int, int], ...], TokenBucket | MultiBucket] = {}
        self._lock = threading.Lock()
        self._published = False

    def publish(self) -> None:
        """Tell ``throttle list`` which limits this fleet's config has (once)."""
        if self._published:
            return
        self._published = True
        try:
            self.live.publish_configured(self.settings.limits, self.settings.concurrency)
        except RedisError as exc:  # Redis down: the gate will say so; the CLI can wait
            logger.debug("could not publish the configured limits: %s", exc)

    def state(self) -> LiveState:
        """The live limits; the configured ones if they cannot be read.

        Redis down: ``BackendUnavailable`` (the decision could not be made
        either).  Anything else (a hand-edited key, a proxy refusing a
        command): log it and decide by the configured limits: a broken
        override must never fail tasks.
        """
        try:
            return self.live.state()
        except (RedisError, ValueError, TypeError) as exc:
            if unavailable(exc):
                raise BackendUnavailable("live limits", exc) from exc
            logger.exception("cannot read the live limits; deciding by the configured ones")
            return self.live.fall_back()

    def effective(self, plan: TaskPlan, tenant: str | None, state: LiveState, at: float | None = None) -> Effective:
        """The task's limits in force now (or at Redis time ``at``: ``LiveState.in_force``), split by mode."""
        enforce: list[tuple[str, Limit]] = []
        shadow: list[tuple[str, Limit]] = []
        versions: list[str] = []
        pause_left = 0.0
        for nl in plan.limits:
            in_force = state.in_force(nl.name, nl, at=at)
            if in_force.override_error is not None:
                logger.error("ignoring the live override of %s: %s", nl.name, in_force.override_error)
            limit = in_force.limit if in_force.limit is not None else nl.limit
            pause_left = max(pause_left, in_force.pause_left)
            if in_force.mode == "shadow":
                shadow.append((in_force.bucket(tenant), limit))
            else:
                enforce.append((in_force.bucket(tenant), limit))
                versions.append(str(in_force.version))
        return Effective(tuple(enforce), tuple(shadow), ",".join(versions), pause_left)

    def buckets(self, parts: Sequence[tuple[str, Limit]]) -> TokenBucket | MultiBucket:
        key = tuple((name, limit.interval_us, limit.tau_us) for name, limit in parts)
        found = self._buckets.get(key)
        if found is None:
            made = [TokenBucket(self.redis, name, rate=limit, prefix=self.settings.prefix) for name, limit in parts]
            found = made[0] if len(made) == 1 else MultiBucket(made)
            with self._lock:
                if len(self._buckets) > _MAX_CACHED_BUCKETS:
                    self._buckets.clear()
                self._buckets[key] = found
        return found


_runtimes: dict[tuple[int, int], Runtime] = {}
_runtimes_lock = threading.Lock()


def runtime_for(app: Celery) -> Runtime:
    """This process's runtime for ``app`` (keyed by pid too: see the module docstring)."""
    ident = (id(app), os.getpid())
    rt = _runtimes.get(ident)
    if rt is None:
        with _runtimes_lock:
            rt = _runtimes.get(ident)
            if rt is None:
                rt = Runtime(settings_for(app))
                _runtimes[ident] = rt
    return rt
