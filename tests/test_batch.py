"""consume_many / peek_many / book_many: many decisions, one round trip, each
decision the same as it would be alone."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio

from throttle import (
    AsyncMultiBucket,
    AsyncTokenBucket,
    BackendUnavailable,
    MultiBucket,
    TokenBucket,
    book_many,
    consume_many,
    consume_many_async,
    peek_many,
)
from throttle.batch import CHUNK
from throttle.testing.redis_server import RedisServer


def commands(r: redis.Redis, name: str) -> int:
    stats = r.info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0))


def test_one_round_trip_for_many_tenants(r: redis.Redis, prefix: str) -> None:
    buckets = [TokenBucket(r, f"{prefix}:t{i}", rate="1/m", burst=2) for i in range(300)]
    buckets[0].peek()  # the script is loaded
    before = commands(r, "evalsha")
    first = consume_many(buckets)
    assert commands(r, "evalsha") - before == 1
    assert all(d.allowed and d.remaining == 1 for d in first)
    consume_many(buckets)
    third = consume_many(buckets)
    assert not any(d.allowed for d in third)
    assert all(55 < d.retry_after <= 60 for d in third)
    # The same answers as the buckets give alone.
    assert [d.remaining for d in peek_many(buckets)] == [b.peek().remaining for b in buckets]


def test_decisions_in_order_see_each_other(r: redis.Redis, prefix: str) -> None:
    bucket = TokenBucket(r, f"{prefix}:same", rate="1/m", burst=3)
    decisions = consume_many([bucket] * 5, cost=[1, 1, 2, 1, 1])
    assert [d.allowed for d in decisions] == [True, True, False, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 1, 0, 0]


def test_multi_buckets_and_mixed_costs(r: redis.Redis, prefix: str) -> None:
    fleet = TokenBucket(r, f"{prefix}:fleet", rate="1/m", burst=3)
    tenants = [TokenBucket(r, f"{prefix}:tenant{i}", rate="1/m", burst=2) for i in range(3)]
    multis = [MultiBucket([fleet, t]) for t in tenants]
    decisions = consume_many(multis, cost=[2, 2, 1])
    assert [d.allowed for d in decisions] == [True, False, True]
    assert decisions[1].refused_by == f"{prefix}:fleet"
    assert tenants[1].peek().remaining == 2  # all-or-nothing per decision
    assert fleet.peek().remaining == 0


def test_book_many_books_successive_slots(r: redis.Redis, prefix: str) -> None:
    bucket = TokenBucket(r, f"{prefix}:slots", rate="10/s", burst=1)
    decisions = book_many([bucket] * 4, max_wait=0.25)
    assert [d.allowed for d in decisions] == [True, True, True, False]
    waits = [d.retry_after for d in decisions[:3]]
    assert waits[0] == 0 and waits[1] == pytest.approx(0.1, abs=0.002) and waits[2] == pytest.approx(0.2, abs=0.002)


def test_big_batches_are_chunked(r: redis.Redis, prefix: str) -> None:
    buckets = [TokenBucket(r, f"{prefix}:big{i}", rate="1/m", burst=1) for i in range(CHUNK * 2 + 7)]
    buckets[0].peek()
    before = commands(r, "evalsha")
    assert all(d.allowed for d in consume_many(buckets))
    assert commands(r, "evalsha") - before == 3
    assert not any(d.allowed for d in consume_many(buckets))


def test_script_flush_is_survived(r: redis.Redis, prefix: str) -> None:
    buckets = [TokenBucket(r, f"{prefix}:flush{i}", rate="1/m", burst=1) for i in range(3)]
    r.script_flush()
    assert all(d.allowed for d in consume_many(buckets))
    assert not any(d.allowed for d in consume_many(buckets))


def test_redis_down_raises_backend_unavailable() -> None:
    with RedisServer() as server:
        client = redis.Redis(port=server.port, socket_connect_timeout=0.5)
        buckets = [TokenBucket(client, f"down{i}", rate="1/s", burst=1) for i in range(3)]
        assert all(d.allowed for d in consume_many(buckets))
        server.stop()
        with pytest.raises(BackendUnavailable):
            consume_many(buckets)
        server.start()
        assert all(d.allowed for d in consume_many(buckets))  # empty memory: full buckets


def test_bad_input(r: redis.Redis, prefix: str) -> None:
    bucket = TokenBucket(r, f"{prefix}:bad", rate="1/s", burst=2)
    other = TokenBucket(redis.Redis(port=1), "x", rate=1)
    assert consume_many([]) == []
    with pytest.raises(TypeError, match="buckets"):
        consume_many(bucket)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="buckets"):
        consume_many(["x"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cost"):
        consume_many([bucket], cost=[1, 1])
    with pytest.raises(ValueError, match="cost"):
        consume_many([bucket], cost=3)
    with pytest.raises(ValueError, match="max_wait"):
        book_many([bucket], max_wait=float("nan"))
    with pytest.raises(ValueError, match="one redis client"):
        consume_many([bucket, other])


def test_asyncio(redis_url: str, prefix: str) -> None:
    async def run() -> list[bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            one = AsyncTokenBucket(client, f"{prefix}:a1", rate="1/m", burst=1)
            two = AsyncTokenBucket(client, f"{prefix}:a2", rate="1/m", burst=2)
            both = AsyncMultiBucket([one, two])
            first = await consume_many_async([one, two, both])
            return [d.allowed for d in first]
        finally:
            await client.aclose()

    assert asyncio.run(run()) == [True, True, False]
