"""Redis Cluster: a real 3-master cluster on loopback ports, started here.

The buckets, multi-limit decisions (in one slot and across slots),
reservations, pauses, the asyncio client and a Celery fleet all run against
it unchanged; the keys spread over the shards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from bench.hammer import hammer
from bench.limiters import throttle_bucket
from tests.fleet import SYSTEM_REDIS_BROKER, Fleet, broker_available
from throttle import AsyncMultiBucket, AsyncSemaphore, AsyncTokenBucket, MultiBucket, Semaphore, TokenBucket
from throttle.connect import client_from_url
from throttle.keys import BucketKeys
from throttle.testing.cluster import EmbeddedCluster
from throttle.testing.windows import peak_in_window
from throttle.tickets import Verdict

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    made = EmbeddedCluster(masters=3)
    try:
        made.start()
    except RuntimeError as exc:
        if "cluster" in str(exc).lower() and "support" in str(exc).lower():
            pytest.skip(f"redis-server has no cluster support: {exc}")
        raise
    yield made
    made.close()


@pytest.fixture
def rc(cluster: EmbeddedCluster) -> Iterator[RedisCluster]:
    client = client_from_url(cluster.url)
    assert isinstance(client, RedisCluster)
    yield client
    client.close()


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:8]


def test_url_makes_a_cluster_client(cluster: EmbeddedCluster) -> None:
    nodes = ",".join(f"127.0.0.1:{port}" for _, port in cluster.startup_nodes)
    client = client_from_url(f"redis+cluster://{nodes}")
    assert isinstance(client, RedisCluster)
    assert len(client.get_primaries()) == 3  # type: ignore[no-untyped-call]
    with pytest.raises(ValueError, match="only database 0"):
        client_from_url(f"redis+cluster://{nodes}/3")
    with pytest.raises(ValueError, match="host:port"):
        client_from_url("redis+cluster://127.0.0.1")


def test_bucket_on_a_cluster(rc: RedisCluster, tag: str) -> None:
    bucket = TokenBucket(rc, f"api-{tag}", rate="10/s", burst=3)
    assert [bucket.consume().allowed for _ in range(4)] == [True, True, True, False]
    assert 0.05 < bucket.peek().retry_after <= 0.1
    seconds = bucket.reserve(max_wait=5)
    assert 0.05 < seconds <= 0.2
    paused = bucket.pause(1.0)
    now, paused_until = bucket.slot_status()
    assert paused_until == pytest.approx(paused.server_time + 1.0, abs=0.001)
    assert now >= paused.server_time
    bucket.reset()
    assert bucket.consume().allowed
    assert rc.pttl(bucket.key) > 0


def test_keys_spread_over_the_shards(cluster: EmbeddedCluster, rc: RedisCluster, tag: str) -> None:
    """3,000 tenants' buckets: each shard holds a third, within +-10 %."""
    tenants = 3000
    for i in range(tenants):
        TokenBucket(rc, f"tenant-{tag}:{i}", rate="1/m", burst=1).consume()
    per_shard = []
    for server in cluster.servers:
        node = redis.Redis(port=server.port)
        per_shard.append(sum(1 for _ in node.scan_iter(match=f"throttle:{{tenant-{tag}:*", count=1000)))
        node.close()
    assert sum(per_shard) == tenants
    assert all(abs(n - tenants / 3) <= 0.1 * tenants / 3 for n in per_shard), per_shard


def test_multi_bucket_with_a_shared_tag_is_one_call(rc: RedisCluster, tag: str) -> None:
    api = TokenBucket(rc, f"{{{tag}}}:api", rate="10/s", burst=2)
    mail = TokenBucket(rc, f"{{{tag}}}:mail", rate="10/s", burst=1)
    both = MultiBucket([api, mail])
    assert both._parts == []  # one slot: one script call
    assert both.consume().allowed
    refused = both.consume()
    assert not refused.allowed and refused.refused_by == f"{{{tag}}}:mail"
    assert api.peek().remaining == 1  # all-or-nothing: api kept its token


def test_multi_bucket_across_slots_is_all_or_nothing(rc: RedisCluster, tag: str) -> None:
    """Buckets on different shards: decided slot by slot; a refusal in a later
    slot gives back what an earlier slot took."""
    fleet = TokenBucket(rc, f"fleet-{tag}", rate="10/s", burst=5)
    tenant = TokenBucket(rc, f"tenant-{tag}", rate="1/m", burst=1)
    both = MultiBucket([fleet, tenant])
    assert len(both._parts) == 2
    assert both.consume().allowed
    assert fleet.peek().remaining == 4
    refused = both.consume()
    assert not refused.allowed and refused.refused_by == f"tenant-{tag}"
    assert 55 < refused.retry_after <= 60
    assert fleet.peek().remaining == 4, "the fleet's token was given back"
    # A booking refused beyond max_wait leaves the earlier slot's booking in
    # place (forfeit): rewinding it could hand out a slot booked behind it twice.
    assert not both.book(max_wait=1).allowed
    assert fleet.peek().remaining == 3
    booked = both.book(max_wait=120)
    assert booked.allowed and 55 < booked.retry_after <= 60
    # A pause covers every slot.
    both.pause(2.0)
    now, paused_until = both.slot_status()
    assert paused_until == pytest.approx(now + 2.0, abs=0.05)


def test_many_processes_across_slots_never_over_admit(rc: RedisCluster, tag: str) -> None:
    """Refunds keep every bucket within its limit under contention."""
    fleet = TokenBucket(rc, f"fleet-{tag}", rate="1/m", burst=20)
    tenants = [TokenBucket(rc, f"t{i}-{tag}", rate="1/m", burst=8) for i in range(4)]
    multis = [MultiBucket([fleet, t]) for t in tenants]
    granted: Counter[int] = Counter()
    for _ in range(20):
        for i, multi in enumerate(multis):
            granted[i] += multi.consume().allowed
    assert sum(granted.values()) == 20  # the fleet's burst
    assert all(n <= 8 for n in granted.values())
    assert fleet.peek().remaining == 0


def test_asyncio_cluster_client(cluster: EmbeddedCluster, tag: str) -> None:
    async def run() -> tuple[list[bool], bool, bool]:
        client = AsyncRedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
        try:
            one = AsyncTokenBucket(client, f"a-{tag}", rate="10/s", burst=2)
            other = AsyncTokenBucket(client, f"b-{tag}", rate="1/m", burst=1)
            grants = [(await one.consume()).allowed for _ in range(3)]
            both = AsyncMultiBucket([one, other])
            await one.reset()
            first = (await both.consume()).allowed
            second = (await both.consume()).allowed
            remaining = (await one.peek()).remaining
            assert remaining == 1  # refunded after the second refusal
            return grants, first, second
        finally:
            await client.aclose()

    grants, first, second = asyncio.run(run())
    assert grants == [True, True, False]
    assert first and not second


def test_semaphores_on_a_cluster(cluster: EmbeddedCluster, rc: RedisCluster, tag: str) -> None:
    """A semaphore's two keys share its name's slot (no CROSSSLOT); names spread over the shards."""
    sems = [Semaphore(rc, f"s{i}-{tag}", 2, expiry=5) for i in range(12)]
    for sem in sems:
        a, b = sem.try_acquire(description="one"), sem.try_acquire()
        assert a is not None and b is not None and sem.try_acquire() is None
        assert next(h.description for h in sem.holders()) == "one"
        assert a.release() and sem.held() == 1
    nodes = {rc.get_node_from_key(sem.keys.holders).name for sem in sems}  # type: ignore[no-untyped-call]
    assert len(nodes) >= 2, "12 names on one shard"

    async def run() -> int:
        client = AsyncRedisCluster(host="127.0.0.1", port=cluster.servers[0].port)
        try:
            sem = AsyncSemaphore(client, f"async-{tag}", 1, expiry=5)
            async with await sem.acquire(timeout=1):
                assert await sem.try_acquire() is None
                assert len(await sem.holders()) == 1
            return await sem.held()
        finally:
            await client.aclose()

    assert asyncio.run(run()) == 0


@pytest.mark.slow
def test_fidelity_on_a_cluster(cluster: EmbeddedCluster, tag: str) -> None:
    """Eight processes on one key of the cluster: within one token above, 3 % below."""
    rate, burst = 200, 20
    result = hammer(partial(throttle_bucket, cluster.url, f"fid-{tag}", rate, burst), processes=8, duration=5.0)
    assert result.errors == 0
    ideal = result.ideal(rate, burst)
    assert ideal * 0.97 <= result.tokens <= ideal + 1


@pytest.mark.slow
@pytest.mark.fleet
def test_fleet_on_a_cluster(cluster: EmbeddedCluster, redis_url: str) -> None:
    """Celery workers with throttle_redis_url = redis+cluster://: two limits per
    task (the fleet's and the tenant's, on different shards) both hold; waits
    over 1 s park in the waiting room (its own slot, its index in another) and
    the fleet releases them, each task once, no room key left."""
    if not broker_available(SYSTEM_REDIS_BROKER):
        pytest.skip("no Redis broker on 127.0.0.1:6379")
    from throttle.metrics import read_metrics
    from throttle.room import WaitingRoom

    limits = {"api": {"rate": "20/s", "burst": 5, "per_key": False}, "tenant": {"rate": "10/s", "burst": 1}}
    fleet = Fleet(
        SYSTEM_REDIS_BROKER, cluster.url, redis_url, limits=limits, workers=2, extra_env={"THROTTLE_PARK_AFTER": "1"}
    )
    prefix = f"throttle-{fleet.queue}"
    client = client_from_url(cluster.url)
    try:
        fleet.start()
        calls = [(i, f"tenant{i % 3}") for i in range(90)]
        ids = fleet.send("fleet.both_work", calls)
        records = fleet.wait_for_records(len(ids), timeout=120)
        assert read_metrics(client, prefix, ["api"])["api"].get("parked", 0) > 0, "90 tasks at 20/s: some park"
        room = WaitingRoom(client, prefix)
        deadline = time.monotonic() + 10
        while room.rooms() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert room.rooms() == [], "the emptied room left the index"
    finally:
        fleet.stop()
        fleet.purge()
        client.close()
    ran = Counter(r["id"] for r in records)
    assert set(ran) == set(ids) and max(ran.values()) == 1
    assert peak_in_window([r["t"] for r in records]) <= 20 + 5
    for tenant in ("tenant0", "tenant1", "tenant2"):
        assert peak_in_window([r["t"] for r in records if r["tenant"] == tenant]) <= 10 + 1
    assert fleet.counts("failed") == {}


def test_batch_on_a_cluster(rc: RedisCluster, tag: str) -> None:
    """consume_many groups the decisions by slot: one script call per slot, in
    one cluster pipeline; a MultiBucket across slots is decided on its own."""
    from throttle import consume_many

    tenants = [TokenBucket(rc, f"b-{tag}:{i}", rate="1/m", burst=1) for i in range(200)]
    shared = [TokenBucket(rc, f"{{{tag}}}:s{i}", rate="1/m", burst=1) for i in range(50)]
    across = MultiBucket([TokenBucket(rc, f"x-{tag}", rate="1/m", burst=1), tenants[0]])
    decisions = consume_many([*tenants, *shared, across])
    assert all(d.allowed for d in decisions[:-1])
    assert not decisions[-1].allowed and decisions[-1].refused_by == f"b-{tag}:0"
    assert TokenBucket(rc, f"x-{tag}", rate="1/m", burst=1).peek().allowed, "refunded"
    assert not any(d.allowed for d in consume_many([*tenants, *shared]))


@pytest.mark.parametrize("tenant", ["{}x}", "}x", "a{}b", "{x", "{{}}", "x}:paused"])
def test_tenant_names_with_braces_keep_a_bucket_in_one_slot(rc: RedisCluster, tag: str, tenant: str) -> None:
    """Issue 12, point 9: Redis Cluster's rule (first ``{``, first ``}`` after it,
    ``{}`` is no tag): a bucket, its markers and its tickets share one slot,
    so pausing, resetting and redeeming never fail with CROSSSLOT."""
    from redis.crc import key_slot

    name = f"api-{tag}:{tenant}"
    keys = BucketKeys("throttle", name)
    slots = {key_slot(str(k).encode()) for k in (keys.bucket, keys.paused, keys.reset, keys.ticket("t"))}
    assert len(slots) == 1, (keys.bucket, keys.paused)
    bucket = TokenBucket(rc, name, rate="10/s", burst=1)
    assert bucket.consume().allowed
    decision = bucket.book(max_wait=5)
    bucket.issue_ticket("t", decision)
    bucket.pause(0.5)
    assert bucket.redeem("t", grace=0.025).verdict is Verdict.PAUSED
    bucket.reset()
    assert bucket.consume().allowed


def test_waiting_room_on_a_cluster(cluster: EmbeddedCluster, rc: RedisCluster, tag: str) -> None:
    """Each room's scripts touch its own slot only (a CROSSSLOT error otherwise);
    tenants' rooms spread over the shards; the index is one key of its own."""
    from throttle import status
    from throttle.keys import RoomKeys
    from throttle.room import WaitingRoom

    room = WaitingRoom(rc, tag)
    seconds, micros = rc.time()
    now = int(seconds) + int(micros) / 1e6
    rooms = [f"api:t{i}" for i in range(12)]
    for n, name in enumerate(rooms):
        for k in range(3):
            room.park(name, f"{name}-{k}", now + 0.5 + k * 0.1 + n * 0.01, f"m{k}".encode(), version=0)
    nodes: Any = rc  # redis-py's get_node_from_key has no annotations
    owners = {nodes.get_node_from_key(RoomKeys(tag, name).entries).name for name in rooms}
    assert len(owners) >= 2, "tenants' rooms spread over the shards"
    assert status._parked(rc, tag, ["api"], None)["api"]["parked"] == 36
    _, due = room.due(ahead=5.0)
    assert sorted(due) == sorted(rooms)
    taken: list[str] = []
    for name in due:
        claim = room.claim(name, ahead=5.0, hold=30.0, limit=10)
        assert [p.entry for p in claim.parked] == [f"{name}-{k}" for k in range(3)]
        assert room.first_arrival(name, claim.parked[0].entry, "copy-1", 60)
        assert not room.first_arrival(name, claim.parked[0].entry, "copy-2", 60)
        assert room.ack(name, [p.entry for p in claim.parked]) == 3
        room.settle(name)
        taken.extend(p.entry for p in claim.parked)
    assert len(taken) == 36 and room.rooms() == []
    # Re-plan of a room on its shard.
    for k in range(5):
        room.park("api:t0", f"again-{k}", now + 1000 + k, b"m", version=1)
    assert room.replan("api:t0", 2, None) == 5 and room.planned_version("api:t0") == 2
    assert status._parked(rc, tag, ["api"], "t0")["api"]["parked"] == 5, "the re-planned room keeps its entries"


def test_a_lease_and_a_rate_in_one_call_on_a_cluster(rc: RedisCluster, tag: str) -> None:
    """``lua/leased.lua`` on a cluster: a limit's lease keys share its bucket's slot, so both
    are decided in one call; a refused lease leaves the bucket untouched.  A bucket in
    another slot (a live version ``name@3``) is not combined: the gate makes two calls."""
    from throttle import Limit, TokenBucket
    from throttle.semaphore import LeaseMode, LeaseReply
    from throttle.slots import slot_of

    name = f"both-{tag}"
    bucket = TokenBucket(rc, name, rate=Limit("10/s", 2))
    sem = Semaphore(rc, name, 1, expiry=5)
    assert bucket.can_lease_with(sem.keys.holders)
    decision, raw = bucket.book_leased(1, 1.0, sem._key_list, sem._args(LeaseMode.ACQUIRE, "a", about="x"))
    assert decision is not None and decision.allowed and LeaseReply.parse(raw).granted
    decision, raw = bucket.book_leased(1, 1.0, sem._key_list, sem._args(LeaseMode.ACQUIRE, "b", about="y"))
    assert decision is None and not LeaseReply.parse(raw).granted
    assert bucket.peek().remaining == 1, "the refused lease took no token"
    versioned = TokenBucket(rc, f"{name}@3", rate=Limit("10/s", 2))
    same = slot_of(versioned.keys[0]) == slot_of(sem.keys.holders)
    assert versioned.can_lease_with(sem.keys.holders) == same
