"""Errors raised by throttle.

One base class, ``ThrottleError``, so callers can catch everything the limiter
itself raises.  Bad arguments and bad configuration are not ``ThrottleError``:
they raise ``ValueError``/``TypeError`` naming the parameter, like any Python API.
"""

from __future__ import annotations

import math

__all__ = [
    "ThrottleError",
    "BackendUnavailable",
    "Contention",
    "ReservationRefused",
    "RateLimited",
]


class ThrottleError(Exception):
    """Base class of every error the limiter raises at run time."""


class BackendUnavailable(ThrottleError):
    """Redis could not be reached or could not answer; ``cause`` says why.

    The limiter cannot tell whether a call is allowed, so it says so instead of
    guessing; the Celery gate turns this into its ``throttle_on_backend_error``
    policy.
    """

    def __init__(self, key: str, cause: BaseException) -> None:
        super().__init__(f"rate-limit backend unavailable for {key!r}: {type(cause).__name__}: {cause}")
        self.key = key
        self.cause = cause

    def __reduce__(self) -> tuple[type[BackendUnavailable], tuple[str, BaseException]]:
        # Errors cross process boundaries (prefork pool, result backends).
        return (type(self), (self.key, self.cause))


class Contention(ThrottleError):
    """The transaction engine lost its optimistic race too many times in a row."""

    def __init__(self, key: str, attempts: int) -> None:
        super().__init__(f"bucket {key!r} still contended after {attempts} WATCH attempts")
        self.key = key
        self.attempts = attempts

    def __reduce__(self) -> tuple[type[Contention], tuple[str, int]]:
        return (type(self), (self.key, self.attempts))


class ReservationRefused(ThrottleError):
    """``reserve()`` would have to wait longer than ``max_wait``; nothing was booked."""

    def __init__(self, key: str, wait: float, max_wait: float) -> None:
        super().__init__(f"bucket {key!r} has no slot within max_wait={max_wait:g}s (next in {wait:.3f}s)")
        self.key = key
        self.wait = wait
        self.max_wait = max_wait

    def __reduce__(self) -> tuple[type[ReservationRefused], tuple[str, float, float]]:
        return (type(self), (self.key, self.wait, self.max_wait))


class RateLimited(ThrottleError):
    """Raise from a task body when the remote API answers "too many requests".

    ``retry_after`` is the pause, in seconds, that the remote API asked for
    (its ``Retry-After`` header).  A throttled Celery task catches it, pauses
    the shared bucket for the whole fleet and defers itself.
    """

    def __init__(self, retry_after: float = 1.0, message: str | None = None) -> None:
        if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)):
            raise TypeError(f"retry_after must be a number of seconds, got {retry_after!r}")
        if math.isnan(retry_after) or math.isinf(retry_after) or retry_after < 0:
            raise ValueError(f"retry_after must be a finite number of seconds >= 0, got {retry_after!r}")
        super().__init__(message or f"remote API rate limit hit; retry after {retry_after:g}s")
        self.retry_after = float(retry_after)

    def __reduce__(self) -> tuple[type[RateLimited], tuple[float, str]]:
        return (type(self), (self.retry_after, str(self)))
