"""Real worker fleets sharing one limit: the acceptance tests of ThrottledTask.

Workers are real ``celery worker`` processes (prefork unless stated) on a
queue of their own; the broker is the machine's Redis or RabbitMQ; the
buckets live in the test session's private redis-server.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
import redis

from tests.celery.conftest import broker as _broker
from throttle.celery import EPSILON_S
from throttle.live import LiveLimits
from throttle.testing.redis_server import RedisServer
from throttle.testing.windows import Segment, peak_in_window, violations

pytestmark = [pytest.mark.fleet, pytest.mark.slow]


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_fleet_holds_the_limit(fleet_factory: Any, broker: str) -> None:
    """4 prefork workers x concurrency 2, 20/s burst 5, 200 tasks at once."""
    fleet = fleet_factory(_broker(broker), {"api": {"rate": "20/s", "burst": 5}})
    ids = fleet.send("fleet.work", [(i,) for i in range(200)])
    records = fleet.wait_for_records(200, timeout=60)

    ran = Counter(r["id"] for r in records)
    assert set(ran) == set(ids), "every task ran"
    assert max(ran.values()) == 1, "no task ran twice"
    starts = sorted(r["t"] for r in records)
    assert peak_in_window(starts) <= 25, "at most rate + burst bodies in any 1 s"
    # Slot booking uses the limit: ideal 9.75 s.  Tasks the initial flood
    # holds back more than 25 ms past their slot forfeit it (exactness over
    # throughput): measured 10.0-10.4 s on an idle machine in an earlier
    # session, 11.8-12.3 s on the same 2-core machine today (the code of
    # then measures the same today).  Speed is the benchmarks' to measure;
    # this bound only says booking works (forfeits cost < 50 %).
    assert starts[-1] - starts[0] <= 9.75 * 1.5, "slot booking uses the limit"
    assert all(r["retries"] == 0 for r in records), "deferrals never spend the retry budget"
    deferred = sum(fleet.counts("deferred").values())
    print(
        f"fleet ({broker}): peak {peak_in_window(starts)} in any 1 s, first to last {starts[-1] - starts[0]:.2f} s, "
        f"{deferred / 200:.3f} deferrals per task {dict(fleet.counts('deferred'))}"
    )
    # One deferral per task is what booking costs (the flood finds the bucket
    # empty once); a few more come back early or late and go round again.
    # Measured 1.00-1.03 on an idle or CPU-loaded machine, 1.215 once in a CI run
    # (38 early arrivals, before the clock offset kept the best of several
    # round trips).  The figure is the demo's and the benchmarks' to report;
    # this bound catches a task that goes round again and again (>= 1.5).
    assert deferred / 200 < 1.5, f"{deferred} deferrals for 200 tasks"
    # The promise on every window, not only 1 s ones.
    assert not violations(starts, [Segment(0, 20, 5)], EPSILON_S)


def test_threads_pool_holds_the_limit(fleet_factory: Any) -> None:
    """The threads pool shares one task object across threads: same guarantees."""
    fleet = fleet_factory(_broker("redis"), {}, workers=2, concurrency=4, pool="threads")
    ids = fleet.send("fleet.work", [(i,) for i in range(100)])
    records = fleet.wait_for_records(100, timeout=60)
    ran = Counter(r["id"] for r in records)
    assert set(ran) == set(ids) and max(ran.values()) == 1
    starts = sorted(r["t"] for r in records)
    assert peak_in_window(starts) <= 25
    assert all(r["retries"] == 0 for r in records)


def test_two_task_types_share_one_limit(fleet_factory: Any) -> None:
    fleet = fleet_factory(_broker("redis"), {"api": {"rate": "10/s", "burst": 2}}, workers=2)
    calls = [(i,) for i in range(30)]
    ids = fleet.send("fleet.work", calls) + fleet.send("fleet.other_work", calls)
    records = fleet.wait_for_records(60, timeout=60)
    assert {r["id"] for r in records} == set(ids)
    assert {r["task"] for r in records} == {"fleet.work", "fleet.other_work"}
    starts = sorted(r["t"] for r in records)
    # One shared bucket: 60 tasks need (60 - 2) / 10 = 5.8 s, never 2.9 s each.
    assert peak_in_window(starts) <= 12
    assert starts[-1] - starts[0] >= 5.8 - 0.1


def test_tenants_have_their_own_buckets(fleet_factory: Any) -> None:
    """One tenant's flood does not delay another tenant."""
    fleet = fleet_factory(_broker("redis"), {"tenant": {"rate": "5/s", "burst": 1}}, workers=2)
    fleet.send("fleet.tenant_work", [(i, "flood") for i in range(40)])
    sent_at = time.time()
    fleet.send("fleet.tenant_work", [(i, "quiet") for i in range(5)])
    records = fleet.wait_for_records(45, timeout=60)
    quiet = sorted(r["t"] for r in records if r["tenant"] == "quiet")
    flood = sorted(r["t"] for r in records if r["tenant"] == "flood")
    assert len(quiet) == 5 and len(flood) == 40
    # The quiet tenant's 5 calls take 4 / 5 = 0.8 s at its own rate; the
    # flood's bucket is 8 s deep.
    assert quiet[-1] - sent_at <= 3.0
    assert flood[-1] - flood[0] >= (40 - 1) / 5 - 0.1
    assert peak_in_window(flood) <= 6 and peak_in_window(quiet) <= 6


def test_rate_limited_pauses_the_whole_fleet(fleet_factory: Any) -> None:
    fleet = fleet_factory(_broker("redis"), {"api": {"rate": "20/s", "burst": 5}})
    [raiser] = fleet.send("fleet.hit_429_once", [(0, 2.0)])
    fleet.wait_for_records(1, timeout=30)
    fleet.send("fleet.work", [(i,) for i in range(40)])
    records = fleet.wait_for_records(42, timeout=60)
    raised_at = next(r["t"] for r in records if r.get("raised"))
    # The task that raised completes, once more, after the pause.
    assert [r for r in records if r["id"] == raiser and not r.get("raised")]
    others = sorted(r["t"] for r in records if not r.get("raised"))
    assert len(others) == 41
    paused = [t for t in others if raised_at < t < raised_at + 2.0]
    assert paused == [], f"{len(paused)} bodies started during the 2 s pause"
    # Then work resumes at the rate (from an empty bucket).
    assert others[0] >= raised_at + 2.0
    assert peak_in_window(others) <= 25
    assert all(r["retries"] == 0 for r in records)


def test_deferred_five_times_with_max_retries_zero(fleet_factory: Any) -> None:
    fleet = fleet_factory(
        _broker("redis"),
        {"api": {"rate": "1/s", "burst": 1}},
        workers=1,
        extra_env={"THROTTLE_MAX_COUNTDOWN": "0.4"},
    )
    ids = fleet.send("fleet.no_retries", [(i,) for i in range(3)])
    records = fleet.wait_for_records(3, timeout=30)
    assert {r["id"] for r in records} == set(ids)
    last = max(records, key=lambda r: r["t"])
    # Its slot was 2 s away and no countdown may exceed 0.4 s: it hopped.
    assert last["deferrals"] >= 5
    assert last["retries"] == 0
    assert fleet.counts("failed") == {}


def test_backend_down_defer_loses_nothing(fleet_factory: Any, redis_url: str, restartable_redis: RedisServer) -> None:
    fleet = fleet_factory(
        _broker("redis"), {"api": {"rate": "50/s", "burst": 10}}, workers=2, throttle_redis_url=restartable_redis.url
    )
    restartable_redis.stop()
    ids = fleet.send("fleet.work", [(i,) for i in range(20)])
    time.sleep(3)
    assert fleet.records() == [], "with 'defer' no body runs while Redis is down"
    assert fleet.counts("backend_error").get("defer", 0) >= 20
    restartable_redis.start()
    records = fleet.wait_for_records(20, timeout=90)
    ran = Counter(r["id"] for r in records)
    assert set(ran) == set(ids) and max(ran.values()) == 1


def test_backend_down_allow_runs_unthrottled(fleet_factory: Any, restartable_redis: RedisServer) -> None:
    fleet = fleet_factory(
        _broker("redis"),
        {"api": {"rate": "1/m", "burst": 1}},
        workers=1,
        throttle_redis_url=restartable_redis.url,
        extra_env={"THROTTLE_ON_BACKEND_ERROR": "allow"},
    )
    restartable_redis.stop()
    ids = fleet.send("fleet.work", [(i,) for i in range(5)])
    records = fleet.wait_for_records(5, timeout=60)
    assert {r["id"] for r in records} == set(ids)
    assert fleet.counts("backend_error") == {"allow": 5}


def test_backend_down_fail_fails_the_task(fleet_factory: Any, restartable_redis: RedisServer) -> None:
    fleet = fleet_factory(
        _broker("redis"),
        {"api": {"rate": "10/s", "burst": 1}},
        workers=1,
        throttle_redis_url=restartable_redis.url,
        extra_env={"THROTTLE_ON_BACKEND_ERROR": "fail"},
    )
    restartable_redis.stop()
    fleet.send("fleet.work", [(i,) for i in range(3)])
    deadline = time.monotonic() + 60
    while fleet.counts("failed").get("BackendUnavailable", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fleet.counts("failed") == {"BackendUnavailable": 3}
    assert fleet.records() == []


def test_an_idle_fleet_lists_its_limits(fleet_factory: Any, redis_url: str) -> None:
    """Workers publish their configured limits when they start, not at their
    first task: ``throttle list`` shows an idle fleet's limits (and ``throttle
    pause NAME`` knows them) within a second of the workers being ready."""
    from tests.test_cli import run

    fleet = fleet_factory(_broker("redis"), {"api": {"rate": "7/s", "burst": 3}}, workers=1, concurrency=1)
    prefix = f"throttle-{fleet.queue}"
    client = redis.Redis.from_url(redis_url)
    try:
        live = LiveLimits(client, prefix)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and "api" not in live.configured():
            time.sleep(0.05)
        assert "api" in live.configured(), "published within a second of the worker being ready"
    finally:
        client.close()
    listed = json.loads(run(redis_url, prefix, "list", "--json").stdout)
    assert listed["api"]["rate"] == 7 and listed["api"]["burst"] == 3, listed
    assert fleet.records() == [], "no task ran"
    paused = run(redis_url, prefix, "pause", "api", "--for", "5s")
    assert paused.returncode == 0, paused.stderr
