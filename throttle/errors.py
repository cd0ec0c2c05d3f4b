"""Errors raised by throttle.

One base class, ``ThrottleError``, so callers can catch everything the limiter
itself raises.  Bad arguments and bad configuration are not ``ThrottleError``:
they raise ``ValueError``/``TypeError`` naming the parameter, like any Python API.

Every error keeps its data as attributes (``retry_after``, the key...) and its
constructor's arguments as ``args``: errors cross process boundaries (the
prefork pool) and result backends, which rebuild an exception as
``type(*args)``, so they must come back whole, not as a plain ``Exception``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "ThrottleError",
    "BackendUnavailable",
    "Contention",
    "ReservationRefused",
    "RateLimited",
    "ThrottleDeferralExpired",
    "LeaseUnavailable",
]


class ThrottleError(Exception):
    """Base class of every error the limiter raises at run time."""

    def __post_init__(self: Any) -> None:
        # Dataclass subclasses: their fields are the exception's args.
        Exception.__init__(self, *(getattr(self, f.name) for f in fields(self)))


@dataclass(eq=False)
class BackendUnavailable(ThrottleError):
    """Redis could not be reached or could not answer; ``cause`` says why.

    The limiter cannot tell whether a call is allowed, so it says so instead of
    guessing; the Celery gate turns this into its ``throttle_on_backend_error``
    policy.  ``cause`` is the Redis error (a string once it crossed a result
    backend that serializes to JSON).
    """

    key: str
    cause: BaseException | str

    def __str__(self) -> str:
        cause = self.cause if isinstance(self.cause, str) else f"{type(self.cause).__name__}: {self.cause}"
        return f"rate-limit backend unavailable for {self.key!r}: {cause}"


@dataclass(eq=False)
class ReservationRefused(ThrottleError):
    """``reserve()`` would have to wait longer than ``max_wait``; nothing was booked.

    ``wait`` is how far the next free slot is: call again with a larger
    ``max_wait``, or give the work up (``book()`` says the same as a value).
    """

    key: str
    wait: float
    max_wait: float

    def __str__(self) -> str:
        return f"bucket {self.key!r} has no slot within max_wait={self.max_wait:g}s (next in {self.wait:.3f}s)"


@dataclass(eq=False)
class RateLimited(ThrottleError):
    """Raise from a task body when the remote API answers "too many requests".

    ``retry_after`` is the pause, in seconds, that the remote API asked for
    (its ``Retry-After`` header).  A throttled Celery task catches it, pauses
    the shared bucket for the whole fleet and defers itself.
    """

    retry_after: float = 1.0
    message: str | None = None

    def __post_init__(self) -> None:
        value = self.retry_after
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"retry_after must be a number of seconds, got {value!r}")
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise ValueError(f"retry_after must be a finite number of seconds >= 0, got {value!r}")
        self.retry_after = float(value)
        super().__post_init__()

    def __str__(self) -> str:
        return self.message or f"remote API rate limit hit; retry after {self.retry_after:g}s"


@dataclass(eq=False)
class Contention(ThrottleError):
    """The transaction engine lost its optimistic race too many times in a row."""

    key: str
    attempts: int

    def __str__(self) -> str:
        return f"bucket {self.key!r} still contended after {self.attempts} WATCH attempts"


@dataclass(eq=False)
class LeaseUnavailable(ThrottleError):
    """``Semaphore.acquire(timeout=...)`` found every lease held until its timeout."""

    name: str
    capacity: int
    timeout: float

    def __str__(self) -> str:
        return f"all {self.capacity} leases of {self.name!r} still held after {self.timeout:g}s"


class ThrottleDeferralExpired(ThrottleError):
    """A task would wait longer than ``throttle_max_defer`` in total; it fails."""
