"""The bucket's semantics, checked against a real Redis for every engine.

No test sleeps to hit a boundary: each compares the bucket's answers with its
own numbers (``retry_after``, ``server_time``) and states its tolerance.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis

from tests.engines import Engine
from throttle import (
    BackendUnavailable,
    Decision,
    MultiBucket,
    RedisTokenBucket,
    ReservationRefused,
    TokenBucket,
)
from throttle.testing.redis_server import RedisServer, free_port

# A decision takes well under this on loopback, even on a loaded machine; it
# is the slack allowed between two decisions that should see the same state.
SLACK = 0.25


def test_burst_then_refused(engine: Engine) -> None:
    bucket = engine.bucket("b", rate="1/m", burst=3)
    decisions = [bucket.consume() for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    refused = decisions[-1]
    assert refused.refused_by == "b"
    # One token per minute: the next one is (almost) a minute away.
    assert 60 - SLACK <= refused.retry_after <= 60
    assert 180 - SLACK <= refused.reset_after <= 180
    assert not refused


def test_refills_at_rate(engine: Engine) -> None:
    bucket = engine.bucket("refill", rate="20/s", burst=1)
    first = bucket.consume()
    assert first.allowed
    refused = bucket.consume()
    assert not refused.allowed
    assert 0 < refused.retry_after <= 0.05
    # Wait on Redis' clock, not a guess: poll until the promised moment passed.
    due = refused.server_time + refused.retry_after
    while bucket.server_time() < due:
        pass
    assert bucket.consume().allowed


def test_cost_takes_several_tokens(engine: Engine) -> None:
    bucket = engine.bucket("cost", rate="1/m", burst=5)
    assert bucket.consume(3).remaining == 2
    d = bucket.consume(3)
    assert not d.allowed and d.remaining == 2
    assert bucket.consume(2).allowed


def test_peek_takes_nothing(engine: Engine) -> None:
    bucket = engine.bucket("peek", rate="1/m", burst=2)
    for _ in range(3):
        d = bucket.peek()
        assert d.allowed and d.remaining == 2
    bucket.consume(2)
    assert not bucket.peek().allowed


def test_reset_refills(engine: Engine) -> None:
    bucket = engine.bucket("reset", rate="1/h", burst=1)
    assert bucket.consume().allowed
    assert not bucket.consume().allowed
    bucket.reset()
    assert bucket.consume().allowed


def test_ttl_is_time_to_full(engine: Engine) -> None:
    bucket = engine.bucket("ttl", rate="10/s", burst=5)
    bucket.consume(3)
    pttl = engine.sync_client.pttl(engine.key("ttl"))
    assert 300 - SLACK * 1000 <= pttl <= 300
    # Refused decisions write nothing (and so never extend the TTL).
    bucket2 = engine.bucket("ttl2", rate="1/h", burst=1)
    bucket2.consume()
    before = engine.sync_client.pttl(engine.key("ttl2"))
    bucket2.consume()
    assert engine.sync_client.pttl(engine.key("ttl2")) <= before


def test_idle_bucket_expires(engine: Engine) -> None:
    bucket = engine.bucket("idle", rate=1000, burst=1)
    d = bucket.consume()
    assert d.allowed and d.reset_after <= 0.001
    key = engine.key("idle")
    deadline = bucket.server_time() + 1.0
    while engine.sync_client.exists(key) and bucket.server_time() < deadline:
        pass
    assert not engine.sync_client.exists(key)


def test_reserve_books_successive_slots(engine: Engine) -> None:
    bucket = engine.bucket("reserve", rate="10/s", burst=1)
    slots = []
    for _ in range(5):
        d = bucket.book()
        assert d.allowed
        slots.append(d.server_time + d.retry_after)
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert all(abs(g - 0.1) < 1e-6 for g in gaps), gaps


def test_reserve_refuses_beyond_max_wait(engine: Engine) -> None:
    bucket = engine.bucket("maxwait", rate="1/s", burst=1)
    assert bucket.reserve(max_wait=0) == 0
    assert 1 - SLACK <= bucket.reserve(max_wait=5) <= 1
    with pytest.raises(ReservationRefused) as info:
        bucket.reserve(max_wait=1.5)
    assert 2 - SLACK <= info.value.wait <= 2
    # Nothing was booked by the refusal: the next slot is still at ~2 s.
    assert 2 - SLACK <= bucket.reserve(max_wait=5) <= 2


def test_pause_blocks_then_refills_from_empty(engine: Engine) -> None:
    bucket = engine.bucket("pause", rate="100/s", burst=10)
    p = bucket.pause(0.2)
    refused = bucket.consume()
    assert not refused.allowed
    pause_end = p.server_time + 0.2
    assert pause_end - SLACK <= refused.server_time + refused.retry_after <= pause_end + 1e-6
    while bucket.server_time() < pause_end:
        pass
    assert bucket.consume().allowed
    # Empty after the pause, not full: the fleet restarts at the rate.
    assert bucket.consume().remaining == 0 or not bucket.consume().allowed


def test_multi_bucket_all_or_nothing(engine: Engine) -> None:
    fast = engine.bucket("fast", rate="100/s", burst=5)
    hourly = engine.bucket("hourly", rate="3/h", burst=3)
    both = engine.multi([fast, hourly])
    assert [both.consume().allowed for _ in range(4)] == [True, True, True, False]
    refused = both.consume()
    assert refused.refused_by == "hourly"
    assert refused.retry_after > 1000  # an hourly token is 20 minutes away
    # The refusal took nothing from the fast bucket: it has 5 - 3 = 2 left,
    # plus what refilled meanwhile.
    assert fast.peek().remaining >= 2


def test_multi_bucket_reports_longest_wait(engine: Engine) -> None:
    a = engine.bucket("a", rate="1/s", burst=1)
    b = engine.bucket("b", rate="1/m", burst=1)
    both = engine.multi([a, b])
    assert both.consume().allowed
    refused = both.consume()
    assert refused.refused_by == "b"
    assert 60 - SLACK <= refused.retry_after <= 60


def test_multi_bucket_rejects_bad_sets(redis_url: str, prefix: str) -> None:
    r1 = redis.Redis.from_url(redis_url)
    r2 = redis.Redis.from_url(redis_url)
    a = TokenBucket(r1, "a", rate=1, burst=1, prefix=prefix)
    with pytest.raises(ValueError, match="buckets"):
        MultiBucket([])
    with pytest.raises(ValueError, match="share one redis client"):
        MultiBucket([a, TokenBucket(r2, "b", rate=1, burst=1, prefix=prefix)])
    with pytest.raises(ValueError, match="distinct keys"):
        MultiBucket([a, TokenBucket(r1, "a", rate=2, burst=1, prefix=prefix)])
    with pytest.raises(TypeError, match="TokenBucket"):
        MultiBucket([a, "b"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cost"):
        MultiBucket([a, TokenBucket(r1, "c", rate=1, burst=5, prefix=prefix)]).consume(2)


@pytest.mark.parametrize("decode", [False, True])
def test_original_api(redis_url: str, prefix: str, decode: bool) -> None:
    client = redis.StrictRedis.from_url(redis_url, decode_responses=decode)
    bucket = RedisTokenBucket(client, key=f"{prefix}-api_rate_limit", burst_rate=5, replenishment_rate=1)
    results = [bucket.consume() for _ in range(6)]
    assert results == [True] * 5 + [False]
    assert all(isinstance(x, bool) for x in results)
    seed = RedisTokenBucket(client, key=f"{prefix}-tx", burst_rate=2, replenishment_rate=1, strategy="transaction")
    assert [seed.consume() for _ in range(3)] == [True, True, False]


def test_engines_share_state(redis_url: str, prefix: str) -> None:
    """Script and transaction store the same TAT: a migration can mix them."""
    client = redis.Redis.from_url(redis_url)
    script = TokenBucket(client, "mixed", rate="1/m", burst=2, prefix=prefix)
    tx = TokenBucket(client, "mixed", rate="1/m", burst=2, prefix=prefix, strategy="transaction")
    assert script.consume().allowed
    assert tx.consume().allowed
    assert not script.consume().allowed
    assert not tx.consume().allowed


@pytest.mark.parametrize("key", ["with space", "new\nline", "{brace}", "x" * 10_000, "ünïcode", b"\xff\xfe raw"])
def test_any_key_is_data(engine: Engine, key: str | bytes) -> None:
    """Keys reach Redis only through KEYS: no character changes the script."""
    bucket = engine.bucket(key, rate="1/m", burst=1)
    assert bucket.consume().allowed
    d = bucket.consume()
    assert not d.allowed and d.refused_by == key


def test_reserve_fifty_concurrent(redis_url: str, prefix: str) -> None:
    """50 concurrent reservations at 10/s burst 1: slots 0.1 s apart, none refused."""
    barrier = threading.Barrier(50)
    slots: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def book() -> None:
        client = redis.Redis.from_url(redis_url)
        bucket = TokenBucket(client, "fifty", rate="10/s", burst=1, prefix=prefix)
        barrier.wait()
        try:
            d = bucket.book(max_wait=5.0)
            assert d.allowed
            with lock:
                slots.append(d.server_time + d.retry_after)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=book) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(slots) == 50
    slots.sort()
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert all(abs(g - 0.1) <= 0.005 for g in gaps), gaps
    assert slots[-1] - slots[0] == pytest.approx(4.9, abs=0.005)


def test_script_flush_is_survived(engine: Engine) -> None:
    bucket = engine.bucket("flush", rate="1/m", burst=2)
    assert bucket.consume().allowed
    engine.sync_client.script_flush()
    d = bucket.consume()
    assert d.allowed and d.remaining == 0


def test_redis_restart_is_survived(restartable_redis: RedisServer) -> None:
    client = redis.Redis.from_url(restartable_redis.url)
    bucket = TokenBucket(client, "restart", rate="1/m", burst=2)
    assert bucket.consume().allowed
    assert bucket.consume().allowed
    assert not bucket.consume().allowed
    restartable_redis.restart()
    # Without persistence a restart forgets the bucket: it is full again.
    # (Documented in the README under "Behaviour under faults".)
    d = bucket.consume()
    assert d.allowed and d.remaining == 1
    client.close()


def test_unreachable_redis_raises_backend_unavailable() -> None:
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    bucket = TokenBucket(client, "nowhere", rate=1, burst=1)
    with pytest.raises(BackendUnavailable) as info:
        bucket.consume()
    assert isinstance(info.value.cause, redis.exceptions.ConnectionError)
    assert "nowhere" in str(info.value)
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)


def test_stopped_redis_raises_then_recovers(restartable_redis: RedisServer) -> None:
    client = redis.Redis.from_url(restartable_redis.url, socket_connect_timeout=0.5)
    bucket = TokenBucket(client, "stopped", rate=10, burst=1)
    assert bucket.consume().allowed
    restartable_redis.stop()
    with pytest.raises(BackendUnavailable):
        bucket.consume()
    restartable_redis.start()
    assert bucket.consume().allowed


@pytest.mark.parametrize(
    "garbage",
    [b"not a number", b"nan", b"inf", b"-inf", b"1e300", b"", b"\xff\xfe", b"0x10", b"1_000", b"1e3", b"-5", b" 12"],
)
def test_corrupted_value_recovers_safely(engine: Engine, garbage: bytes) -> None:
    """A value throttle did not write (anything but whole decimal microseconds)
    is treated as an empty bucket and repaired, by every engine alike."""
    bucket = engine.bucket("corrupt", rate="100/s", burst=5)
    key = engine.key("corrupt")
    engine.sync_client.set(key, garbage)
    d = bucket.consume()
    assert d.recovered and not d.allowed
    assert d.retry_after <= 0.01  # empty, refilling at 100/s: not an unbounded wait
    assert engine.sync_client.pttl(key) > 0
    assert bucket.consume(1).recovered is False


def test_wrong_type_value_recovers(engine: Engine) -> None:
    """The seed kept a hash at the key; a leftover one must not crash-loop us."""
    bucket = engine.bucket("seedhash", rate="100/s", burst=5)
    key = engine.key("seedhash")
    engine.sync_client.hset(key, mapping={"tokens": 5, "last_refill": 0})
    d = bucket.consume()
    assert d.recovered and not d.allowed
    assert engine.sync_client.type(key) == b"string"


def test_decision_is_a_value() -> None:
    d = Decision(allowed=True, remaining=3, retry_after=0.0, reset_after=0.5)
    assert d and d == Decision(True, 3, 0.0, 0.5)
    assert not Decision(False, 0, 1.0, 1.0)


def test_a_refused_cross_slot_booking_never_gives_a_slot_twice(r: redis.Redis, prefix: str) -> None:
    """Issue 12, point 10: a booking refused by a later cluster slot leaves the
    earlier slots' bookings in place instead of rewinding them, even when
    another caller booked behind it in between (the rewind handed that caller's
    slot out a second time).  Driven step by step (as ``MultiBucket`` does on
    a cluster) to put the other caller exactly in between."""
    from throttle.gcra import Mode
    from throttle.slots import Split

    a = TokenBucket(r, "split-a", rate="10/s", burst=1, prefix=prefix)
    b = TokenBucket(r, "split-b", rate="1/s", burst=1, prefix=prefix)
    for _ in range(5):
        b.book(max_wait=60)  # b's next slot is about 5 s away
    split = Split(2, Mode.RESERVE, 1, 1_000_000)  # max_wait 1 s: b will refuse
    ours = a.book(max_wait=1)
    assert split.index == 0 and ours.allowed
    done = split.answer(ours)
    other = a.book(max_wait=60)  # another caller books behind us on a
    assert not done and split.index == 1
    done = split.answer(b.book(max_wait=1))
    assert done and split.result is not None and not split.result.allowed, "refused, with no refund step"
    later = a.book(max_wait=60)
    slots = [d.server_time + d.retry_after for d in (ours, other, later)]
    assert slots[0] < slots[1] < slots[2], slots


def test_tickets_are_redeemed_once(r: redis.Redis, prefix: str) -> None:
    """A slot is a ticket in Redis: redeemed once; a copy, a forgery or a reset finds nothing to use."""
    from throttle.tickets import Verdict

    bucket = TokenBucket(r, "tickets", rate="20/s", burst=1, prefix=prefix)
    assert bucket.consume().allowed
    decision = bucket.book(max_wait=5)
    bucket.issue_ticket("task-1", decision)
    assert bucket.redeem("nobody", grace=0.025).verdict is Verdict.NONE
    early = bucket.redeem("task-1", grace=0.025)
    assert early.verdict is Verdict.EARLY and 0 < early.wait <= 0.05
    time.sleep(early.wait)
    assert bucket.redeem("task-1", grace=0.025).verdict is Verdict.GO
    assert bucket.redeem("task-1", grace=0.025).verdict is Verdict.NONE, "used up"
    late = bucket.book(max_wait=5)
    bucket.issue_ticket("task-2", late)
    time.sleep(late.retry_after + 0.06)
    assert bucket.redeem("task-2", grace=0.025).verdict is Verdict.LATE
    booked = bucket.book(max_wait=5)
    bucket.issue_ticket("task-3", booked)
    bucket.reset()
    assert bucket.redeem("task-3", grace=0.025).verdict is Verdict.RESET


def test_original_api_keeps_the_key_as_given(r: redis.Redis, prefix: str) -> None:
    """Issue 12, point 12: ``RedisTokenBucket`` counts where the original implementation did."""
    key = f"{prefix}-seed-key"
    bucket = RedisTokenBucket(r, key=key, burst_rate=2, replenishment_rate=1)
    assert bucket.consume()
    assert r.exists(key) and not r.exists(f"throttle:{{{key}}}")
