"""throttle: one rate limit for a whole Celery fleet, kept in a Redis token bucket.

>>> import redis, throttle
>>> bucket = throttle.TokenBucket(redis.Redis(), "github", rate="10/s", burst=5)
>>> bucket.consume().allowed
True
"""

from __future__ import annotations

from .aio import AsyncMultiBucket, AsyncTokenBucket
from .bucket import Decision, MultiBucket, RedisTokenBucket, TokenBucket
from .errors import BackendUnavailable, Contention, RateLimited, ReservationRefused, ThrottleError
from .limit import Limit, parse_rate

__all__ = [
    "AsyncMultiBucket",
    "AsyncTokenBucket",
    "BackendUnavailable",
    "Contention",
    "Decision",
    "Limit",
    "MultiBucket",
    "RateLimited",
    "RedisTokenBucket",
    "ReservationRefused",
    "ThrottleError",
    "TokenBucket",
    "parse_rate",
]

__version__ = "0.1.0"
