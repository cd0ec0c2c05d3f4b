"""The waiting room's operations against a real Redis: park, claim, acknowledge, re-plan.

What the Celery fleet relies on: an entry is claimed by one releaser only,
a releaser that dies gives its entries back, a task parked again during its
release keeps its new message, a re-plan keeps the order, no room drops out
of the index, and a second copy of a release is told from the first.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from throttle.limit import Limit
from throttle.room import WaitingRoom, persistence_warning
from throttle.testing.redis_server import RedisServer


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


def test_park_claim_ack_in_release_order(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    now = redis_now(r)
    for n, ahead in enumerate([3.0, 1.0, 2.0, 500.0]):
        room.park("api", f"task-{n}", now + ahead, f"message {n}".encode(), version=0)
    _, due = room.due(ahead=5.0)
    assert due == ["api"]
    claim = room.claim("api", ahead=5.0, hold=30.0, limit=10)
    assert [p.entry for p in claim.parked] == ["task-1", "task-2", "task-0"], "in slot order; the far one stays"
    assert claim.parked[0].message == b"message 1" and abs(claim.parked[0].release_at - (now + 1.0)) < 0.001
    assert claim.next_at is not None and claim.next_at < now + 40, "the claims' expiry is the room's next work"
    # A second releaser finds nothing to take.
    assert room.claim("api", ahead=5.0, hold=30.0, limit=10).parked == []
    assert room.ack("api", [p.entry for p in claim.parked]) == 3
    stats = room.stats(["api"])[0]
    assert (stats.parked, stats.claimed) == (1, 0) and stats.next_at is not None
    assert abs(stats.next_at - (now + 500)) < 0.001
    assert r.hlen(room.keys("api").messages) == 1, "acknowledged messages are gone"


def test_two_releasers_never_take_the_same_entry(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    now = redis_now(r)
    for n in range(2000):
        room.park("api", f"t{n}", now + n / 10_000, b"m", version=0)
    taken: list[list[str]] = [[], [], [], []]

    def release(into: list[str]) -> None:
        mine = WaitingRoom(redis.Redis(connection_pool=r.connection_pool), prefix)
        while True:
            parked = mine.claim("api", ahead=5.0, hold=30.0, limit=37).parked
            if not parked:
                return
            into.extend(p.entry for p in parked)

    threads = [threading.Thread(target=release, args=(into,)) for into in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    everything = [entry for into in taken for entry in into]
    assert len(everything) == 2000 and len(set(everything)) == 2000


def test_an_unacknowledged_claim_comes_back_when_it_expires(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    room.park("api", "t1", redis_now(r), b"m1", version=0)
    first = room.claim("api", ahead=1.0, hold=0.2, limit=10)
    assert [p.entry for p in first.parked] == ["t1"]
    # The releaser "dies" here: no ack.
    assert room.claim("api", ahead=1.0, hold=0.2, limit=10).parked == []
    time.sleep(0.25)
    again = room.claim("api", ahead=1.0, hold=30.0, limit=10)
    assert [(p.entry, p.message) for p in again.parked] == [("t1", b"m1")]


def test_a_task_parked_again_during_its_release_keeps_its_new_message(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    now = redis_now(r)
    room.park("api", "t1", now, b"first", version=0)
    claim = room.claim("api", ahead=1.0, hold=30.0, limit=10)
    room.park("api", "t1", now + 100, b"second", version=0)  # it arrived, booked again, parked
    room.ack("api", [p.entry for p in claim.parked])
    assert r.hget(room.keys("api").messages, "t1") == b"second"
    assert room.stats(["api"])[0].parked == 1


def test_replan_keeps_the_order_and_spreads_at_the_new_rate(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    now = redis_now(r)
    for n in range(100):
        room.park("api", f"t{n:03}", now + 3600 + n * 60, b"m", version=0)
    assert room.planned_version("api") == 0
    assert room.replan("api", 1, Limit("10/s", 5)) == 100
    assert room.planned_version("api") == 1
    scored: Any = r.zrange(room.keys("api").entries, 0, -1, withscores=True)
    assert [m.decode() for m, _ in scored] == [f"t{n:03}" for n in range(100)]
    times = [s / 1e6 - now for _, s in scored]
    assert all(0 <= t < 1 for t in times[:5]), "the first burst at once"
    assert abs(times[-1] - times[4] - 95 * 0.1) < 0.01, "then one per emission interval"
    _, due = room.due(ahead=2.0)
    assert due == ["api"], "the index follows the re-plan"


def test_no_room_drops_out_of_the_index(r: redis.Redis, prefix: str) -> None:
    """A releaser that found the room empty takes it out of the index; a park that
    raced with it must put it back (reindex looks again after writing)."""
    room = WaitingRoom(r, prefix)
    now = redis_now(r)
    room.park("api", "t1", now, b"m", version=0)
    claim = room.claim("api", ahead=1.0, hold=30.0, limit=10)
    room.ack("api", ["t1"])
    # The race: a task parks between the claim (room empty) and the reindex.
    keys = room.keys("api")
    r.zadd(keys.entries, {"t2": round((now + 5) * 1e6)})
    r.hset(keys.messages, "t2", b"m2")
    room.reindex("api", claim.next_at if claim.next_at else None)
    assert room.rooms() == ["api"]
    score = r.zscore(room.index, "api")
    assert score is not None and abs(score / 1e6 - (now + 5)) < 0.001


def test_one_limits_rooms_are_found_among_many(r: redis.Redis, prefix: str) -> None:
    """``rooms(limit)``: its own room and its tenants', none of another limit's (``api2``, ``apix:1``)."""
    room = WaitingRoom(r, prefix)
    now = redis_now(r)
    names = ["api", "api:acme", "api:b:c", "api2", "apix:1", *(f"mail:{i}" for i in range(3000))]
    for i, name in enumerate(names):
        room.park(name, f"t{i}", now + 60, b"m", version=0)
    assert room.rooms("api") == ["api", "api:acme", "api:b:c"]
    assert room.rooms("api2") == ["api2"] and room.rooms("nothing") == []
    assert len(room.rooms("mail")) == 3000 and len(room.rooms()) == len(names)


def test_first_arrival_tells_a_second_copy_from_a_redelivery(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    assert room.first_arrival("api", "t1", "copy-a", remember=60)
    assert room.first_arrival("api", "t1", "copy-a", remember=60), "the same copy delivered again runs"
    assert not room.first_arrival("api", "t1", "copy-b", remember=60), "another copy of the release is dropped"
    assert 0 < r.pttl(room.keys("api").released + "t1") <= 60_000


def test_tenants_rooms_live_in_their_own_slots(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    keys = room.keys("api:acme")
    tags = {k[k.index("{") + 1 : k.index("}")] for k in (keys.entries, keys.messages, keys.claims, keys.plan)}
    assert tags == {"api:acme"}
    assert room.keys("api:globex").entries != keys.entries


def test_persistence_is_checked(r: redis.Redis) -> None:
    assert "lost if this Redis restarts" in (persistence_warning(r) or "")  # the test server persists nothing
    with RedisServer(extra_args=["--appendonly", "yes"]) as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert persistence_warning(client) is None
        finally:
            client.close()


def test_an_emptied_room_leaves_no_key(r: redis.Redis, prefix: str) -> None:
    room = WaitingRoom(r, prefix)
    room.park("api", "t1", redis_now(r), b"m", version=3)
    claim = room.claim("api", ahead=1.0, hold=30.0, limit=10)
    room.ack("api", [p.entry for p in claim.parked])
    room.settle("api")
    assert room.rooms() == []
    assert r.keys(f"{prefix}:~room:*") == [], "entries, messages, claims and plan are all gone after the ack"
    # The next park plans the room under the version of its day.
    room.park("api", "t2", redis_now(r) + 100, b"m", version=5)
    assert room.planned_version("api") == 5


def test_operators_see_the_oldest_entry_and_reads_are_bounded(r: redis.Redis, prefix: str) -> None:
    """``list``/``inspect``/metrics show how long the longest-parked task has
    waited, and read a bounded number of rooms (a room per tenant can mean
    100,000 of them)."""
    from throttle import status

    room = WaitingRoom(r, prefix)
    first_parked = redis_now(r)
    room.park("api", "old", first_parked + 100, b"m", version=0)
    time.sleep(0.2)
    room.park("api", "new", first_parked + 50, b"m", version=0)  # released first, parked later
    stats = room.stats(["api"])[0]
    assert stats.oldest_at is not None and abs(stats.oldest_at - first_parked) < 0.05
    assert r.zcard(room.keys("api").since) == 2
    room.park("api", "old", first_parked + 120, b"m2", version=0)  # parked again: keeps its first time
    assert abs((room.stats(["api"])[0].oldest_at or 0) - first_parked) < 0.05
    # Released and acknowledged: the oldest is the next one.
    claim = room.claim("api", ahead=200.0, hold=30.0, limit=1)
    assert [p.entry for p in claim.parked] == ["new"]
    room.ack("api", ["new"])
    assert r.zrange(room.keys("api").since, 0, -1) == [b"old"], "an acknowledged entry leaves the since set"
    claim = room.claim("api", ahead=200.0, hold=30.0, limit=1)
    room.ack("api", ["old"])
    room.settle("api")
    assert r.keys(f"{prefix}:~room:*") == [], "no key left behind"

    # describe(): per limit, with the age; a bounded read says it is partial.
    for tenant in range(5):
        room.park(f"tenant:t{tenant}", "x", redis_now(r) + 100 + tenant, b"m", version=0)
    old_max = status.MAX_ROOMS_READ
    try:
        described = status._parked(r, prefix, ["tenant"], None)["tenant"]
        assert described["parked"] == 5 and not described["parked_partial"]
        assert described["oldest_parked_for"] is not None and described["oldest_parked_for"] < 5
        status.MAX_ROOMS_READ = 3
        described = status._parked(r, prefix, ["tenant"], None)["tenant"]
        assert described["parked"] == 3 and described["parked_partial"], "the 3 rooms due first, and says so"
        assert status._parked(r, prefix, ["tenant"], "t4")["tenant"]["parked"] == 1, "--key reads that room"
    finally:
        status.MAX_ROOMS_READ = old_max
