"""Limiters under measurement, each built inside the process that uses it.

Every factory returns ``decide(cost) -> (allowed, server_time)``; peers that
cannot say when (on the server's clock) they granted return None and the
harness records the client's monotonic time instead.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import redis

Decide = Callable[[int], tuple[bool, float | None]]


def throttle_bucket(url: str, key: str, rate: float | str, burst: int, strategy: str = "script") -> Decide:
    """throttle's TokenBucket with the chosen engine."""
    from throttle import TokenBucket
    from throttle.connect import client_from_url

    bucket = TokenBucket(client_from_url(url), key, rate=rate, burst=burst, strategy=strategy)  # type: ignore[arg-type]

    def decide(cost: int) -> tuple[bool, float | None]:
        d = bucket.consume(cost)
        return d.allowed, d.server_time

    return decide


def limits_moving_window(url: str, key: str, rate: float | str, burst: int, strategy: str = "") -> Decide:
    """alisaifee/limits, moving window over Redis (a sorted set per key).

    A window limit has no burst: ``burst`` requests per ``burst / rate``
    seconds is the closest shape to the token bucket it is compared with.
    """
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import MovingWindowRateLimiter

    from throttle.limit import parse_rate

    per_second = parse_rate(rate)
    window = max(1, round(burst / per_second))
    item = RateLimitItemPerSecond(max(1, round(per_second * window)), window)
    limiter = MovingWindowRateLimiter(RedisStorage(url.replace("redis://", "redis://", 1)))

    def decide(cost: int) -> tuple[bool, float | None]:
        return bool(limiter.hit(item, key, cost=cost)), None

    return decide


def pyrate_token_bucket(url: str, key: str, rate: float | str, burst: int, strategy: str = "") -> Decide:
    """vutran1710/PyrateLimiter 4.x, TokenBucket with RedisStateStore (Lua)."""
    from pyrate_limiter import Duration, Limiter, Rate, StateBucket, TokenBucket
    from pyrate_limiter.buckets.redis_state import RedisStateStore

    from throttle.limit import parse_rate

    per_second = parse_rate(rate)
    rate_item = Rate(max(1, round(per_second)), Duration.SECOND, burst=burst)
    store = RedisStateStore(redis.Redis.from_url(url), key)
    limiter = Limiter(StateBucket([rate_item], algorithm=TokenBucket(), store=store))

    def decide(cost: int) -> tuple[bool, float | None]:
        return bool(limiter.try_acquire(key, weight=cost, blocking=False)), None

    return decide


def seed_client_clock(url: str, key: str, rate: float | str, burst: int, strategy: str = "") -> Decide:
    """The seed's design as first written: WATCH/HGETALL/MULTI/HSET with the
    client's ``time.time()``.  Measured only to show what host clocks do to it.
    """
    from throttle.limit import parse_rate

    client = redis.Redis.from_url(url, decode_responses=True)
    per_second = parse_rate(rate)

    def decide(cost: int) -> tuple[bool, float | None]:
        with client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    state = pipe.hgetall(key)
                    now = time.time()
                    tokens = float(state.get("tokens", burst))
                    last = float(state.get("last_refill", now))
                    tokens = min(burst, tokens + max(0.0, now - last) * per_second)
                    allowed = tokens >= cost
                    if allowed:
                        tokens -= cost
                    pipe.multi()
                    pipe.hset(key, mapping={"tokens": tokens, "last_refill": now})
                    pipe.execute()
                    return allowed, None
                except redis.WatchError:
                    continue

    return decide


def throttle_many_keys(url: str, key: str, rate: float | str, burst: int, keys: int = 1000) -> Decide:
    """throttle's TokenBucket over ``keys`` tenants' buckets, a random one per call."""
    from throttle import Limit, TokenBucket
    from throttle.connect import client_from_url

    client = client_from_url(url)
    limit = Limit(rate, burst)
    buckets = [TokenBucket(client, f"{key}:{i}", rate=limit) for i in range(keys)]
    rng = random.Random()

    def decide(cost: int) -> tuple[bool, float | None]:
        d = rng.choice(buckets).consume(cost)
        return d.allowed, d.server_time

    return decide
