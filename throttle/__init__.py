"""throttle: one rate limit for a whole Celery fleet, kept in a Redis token bucket.

>>> import redis, throttle
>>> bucket = throttle.TokenBucket(redis.Redis(), "github", rate="10/s", burst=5)
>>> bucket.consume().allowed
True
"""

from __future__ import annotations

from .aio import AsyncMultiBucket, AsyncTokenBucket
from .batch import book_many, book_many_async, consume_many, consume_many_async, peek_many, peek_many_async
from .bucket import Decision, MultiBucket, RedisTokenBucket, TokenBucket
from .errors import BackendUnavailable, Contention, LeaseUnavailable, RateLimited, ReservationRefused, ThrottleError
from .limit import Limit, parse_rate
from .semaphore import AsyncLease, AsyncSemaphore, Lease, Semaphore

__all__ = [
    "AsyncLease",
    "AsyncMultiBucket",
    "AsyncSemaphore",
    "AsyncTokenBucket",
    "BackendUnavailable",
    "Contention",
    "Decision",
    "Lease",
    "LeaseUnavailable",
    "Limit",
    "MultiBucket",
    "RateLimited",
    "RedisTokenBucket",
    "ReservationRefused",
    "Semaphore",
    "ThrottleError",
    "TokenBucket",
    "book_many",
    "book_many_async",
    "consume_many",
    "consume_many_async",
    "parse_rate",
    "peek_many",
    "peek_many_async",
]

__version__ = "0.1.0"
