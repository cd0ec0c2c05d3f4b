"""How a deferred task travels: throttle's message headers, why it waits, the re-send.

A deferral re-sends the same task (same id, same ``request.retries``, same
routing, links and chain) with a countdown and a few headers, then ends this
run with ``Ignore``: the retry budget is untouched and no pool slot sleeps.
The headers are bookkeeping (how often, since when), never a permission: a
booked slot is a ticket in Redis (``TokenBucket.issue_ticket``), so copied or
forged headers buy nothing.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore

from ..limit import MAX_WAIT_SECONDS

if TYPE_CHECKING:
    from celery import Signature, Task

logger = logging.getLogger("throttle")

__all__ = [
    "BACKEND_BACKOFF_S",
    "backend_backoff",
    "budget_left",
    "store_deferred",
    "DeferralReason",
    "Deferred",
    "EVENT_DEFERRED",
    "STATE_DEFERRED",
    "Stamp",
    "resend",
    "HEADER_DEFERRALS",
    "HEADER_SLOT",
    "HEADER_SINCE",
    "HEADER_VERSIONS",
    "HEADER_RETRIES",
    "HEADER_ETA",
    "HEADER_RELEASED",
    "HEADER_PARKED",
    "HEADER_LEASE",
    "outgoing",
]

#: Message headers the gate adds when it defers a task.  Celery hands custom
#: headers back as attributes of ``task.request``.
HEADER_DEFERRALS = "throttle_deferrals"  # how many times this task was deferred
HEADER_SLOT = "throttle_slot"  # wall-clock time of the booked slot, for people reading messages
HEADER_SINCE = "throttle_since"  # wall-clock time of the first deferral
HEADER_VERSIONS = "throttle_versions"  # the limits' live versions the slot was booked under
HEADER_RETRIES = "throttle_retries"  # request.retries when deferred: a Celery retry copies headers, not this run
HEADER_ETA = "throttle_eta"  # when it should arrive, Redis time in seconds (see throttle.celery.request)
HEADER_RELEASED = "throttle_released"  # [room, park id, copy id]: released from the waiting room
HEADER_PARKED = "throttle_parked"  # the park id: each park of a task has its own (throttle.celery.release)
HEADER_LEASE = "throttle_lease"  # [limit's lease name, lease id, retries]: a lease handed over to this parked task

#: The Celery event a worker sends for each deferral (when it sends task
#: events: ``celery worker -E`` or ``celery control enable_events``), with
#: the fields ``wait``, ``reason``, ``deferrals`` and ``parked``.  Monitors
#: (Flower, ``celery events``, ``celery.events.state``) show the task
#: ``DEFERRED`` instead of ``STARTED`` while it waits.
EVENT_DEFERRED = "task-deferred"

#: The result state a deferral stores for a task with ``track_started``
#: (which stored STARTED before the gate ran): the task waits, it does not run.
STATE_DEFERRED = "DEFERRED"

#: While Redis is down, policy "defer" re-sends with countdowns from the
#: first to the second, doubling with each deferral (with jitter).
BACKEND_BACKOFF_S = (1.0, 30.0)

#: How hard a deferral tries to publish before giving up (the message was
#: already acknowledged with early acks, so publishing is what keeps it).
_PUBLISH_RETRY = {"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 5.0}


class Deferred(Ignore):  # type: ignore[misc]
    """How the gate ends a run it deferred: Celery's ``Ignore`` (acknowledge, no
    result, no retry), with what the worker's request needs for its event.

    Its constructor's arguments are its ``args``: it crosses from a prefork
    child to the worker's main process pickled.
    """

    def __init__(self, wait: float, reason: str, deferrals: int, parked: bool) -> None:
        super().__init__(wait, reason, deferrals, parked)
        self.wait, self.reason, self.deferrals, self.parked = wait, reason, deferrals, parked

    def fields(self) -> dict[str, Any]:
        """The event's fields (JSON-ready)."""
        return {"wait": round(self.wait, 3), "reason": self.reason, "deferrals": self.deferrals, "parked": self.parked}


class DeferralReason(StrEnum):
    """Why a task was re-sent instead of run (signals, logs and metrics say this)."""

    EMPTY = "empty"  # no token: its slot was booked
    EARLY = "early"  # came back before its slot
    LATE = "late"  # came back more than GRACE_S after its slot: booked again
    CHANGED = "changed"  # its slot was booked under a limit that has changed since
    PAUSED = "paused"  # the limit is paused (an operator, or a 429 after the booking)
    RESET = "reset"  # its bucket was reset after the booking: booked again
    UNBOOKED = "unbooked"  # came with slot headers but no ticket (a copy, a forgery, a duplicate)
    RATE_LIMITED = "rate_limited"  # the body raised RateLimited
    BACKEND = "backend"  # Redis could not answer (policy "defer")
    CONCURRENCY = "concurrency"  # its concurrency limit's leases were all held: queued for the next one


@dataclass(frozen=True)
class Stamp:
    """What throttle's headers say of this delivery (nothing, for a new task)."""

    deferrals: int = 0
    since: float | None = None  # wall-clock time of the first deferral
    booked: bool = False  # deferred to a booked slot (its ticket is in Redis, if anywhere)
    versions: str | None = None  # the live versions it was booked under
    released: tuple[str, str, str] | None = None  # (room, park id, copy id): released from the waiting room

    @classmethod
    def read(cls, request: Any) -> Stamp:
        """The stamp of ``request``; empty when the headers are not this run's.

        ``Task.retry`` copies the request's headers into the retry: the
        retry starts afresh (its own budget, its own booking).
        """
        if header(request, HEADER_DEFERRALS) is None:
            return cls()
        stamped = header(request, HEADER_RETRIES)
        if stamped is not None and _int(stamped) != int(request.retries or 0):
            return cls()
        since = header(request, HEADER_SINCE)
        versions = header(request, HEADER_VERSIONS)
        released = header(request, HEADER_RELEASED)
        is_triple = isinstance(released, (list, tuple)) and len(released) == 3
        return cls(
            deferrals=_int(header(request, HEADER_DEFERRALS)),
            since=float(since) if isinstance(since, (int, float)) else None,
            booked=header(request, HEADER_SLOT) is not None,
            versions=str(versions) if versions is not None else None,
            released=(str(released[0]), str(released[1]), str(released[2])) if is_triple else None,
        )


def resend(
    task: Task, args: list[Any], kwargs: dict[str, Any], stamp: Stamp, wait: float, countdown: float,
    versions: str | None, redis_now: float | None = None,
) -> None:  # fmt: skip
    """Send ``task`` again to arrive in ``countdown`` seconds; ``versions``: booked under these (None: not booked).

    ``redis_now``: the Redis time of the decision, so the arrival is also
    written on Redis' clock (``HEADER_ETA``) for workers whose own clocks differ.
    """
    signature = outgoing(task, args, kwargs, stamp, wait, versions)
    headers = dict(signature.options["headers"])
    if redis_now is not None:
        headers[HEADER_ETA] = round(redis_now + countdown, 6)
    signature.apply_async(countdown=countdown, headers=headers, retry=True, retry_policy=_PUBLISH_RETRY)


def outgoing(
    task: Task, args: list[Any], kwargs: dict[str, Any], stamp: Stamp, wait: float, versions: str | None
) -> Signature:
    """The deferred copy of this delivery: same id, routing, links, with throttle's headers (no ETA yet)."""
    request = task.request
    headers: dict[str, Any] = {
        HEADER_DEFERRALS: stamp.deferrals + 1,
        HEADER_SINCE: stamp.since if stamp.since is not None else time.time(),
        HEADER_RETRIES: int(request.retries or 0),
    }
    if versions is not None:
        headers[HEADER_SLOT] = round((time.time() + wait) * 1000) / 1000
        headers[HEADER_VERSIONS] = versions
    signature = task.signature_from_request(request, args, kwargs)
    merged = {**(signature.options.get("headers") or {}), **headers}
    if versions is None:
        merged.pop(HEADER_SLOT, None)
        merged.pop(HEADER_VERSIONS, None)
    for stale in (HEADER_ETA, HEADER_RELEASED, HEADER_PARKED, HEADER_LEASE):
        merged.pop(stale, None)
    signature.options["headers"] = merged
    return signature


def backend_backoff(deferrals: int) -> float:
    """The countdown of a task deferred because Redis is down, after ``deferrals`` deferrals."""
    low, high = BACKEND_BACKOFF_S
    return float(min(high, low * 2.0 ** min(deferrals, 10)) * random.uniform(0.5, 1.0))


def budget_left(max_defer: float, since: float | None) -> float:
    """Seconds a task may still wait: ``max_defer`` from its first deferral (``since``), as far as a booking goes."""
    limit = min(max_defer, float(MAX_WAIT_SECONDS))
    if since is None:
        return limit
    # Clamped both ways: ``since`` came from another host's clock.
    return min(limit, max(0.0, limit - (time.time() - since)))


def store_deferred(task: Task, deferred: Deferred) -> None:
    """With ``track_started``, Celery stored STARTED before the gate ran: say DEFERRED instead.

    Best effort: the task is already re-sent (or parked), a result backend
    that cannot answer must not lose it.  Nothing is stored otherwise (the
    state stays PENDING, which already says "not run yet").
    """
    request = task.request
    if not task.track_started or task.ignore_result or getattr(request, "ignore_result", False):
        return
    try:
        task.backend.store_result(request.id, deferred.fields(), STATE_DEFERRED, request=request)
    except Exception as exc:  # any backend, any failure: the deferral stands
        logger.warning("%s[%s] could not store its DEFERRED state: %s", task.name, request.id, exc)


def header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(name)
    return value


def _int(value: object) -> int:
    """A header that should be a whole number; 0 when it is not (headers are input)."""
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError, OverflowError):
        return 0
