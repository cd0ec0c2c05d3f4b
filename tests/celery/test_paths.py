"""The limit holds on the paths users take off the happy one (issue 12's list).

Each test runs real ``celery worker`` processes (``tests.paths_app``) and
checks the promise itself on the recorded body starts: in every window of
``w`` seconds, at most ``burst + rate * (w + EPSILON_S)`` starts
(``throttle.testing.windows.violations``).  Each test names the point of the
issue it covers; each was seen failing on the main before the fix (the
closing note lists how).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
import redis

from tests.celery.conftest import broker
from tests.fleet import Fleet, publishing
from throttle.celery import EPSILON_S, HEADER_DEFERRALS, HEADER_RETRIES, HEADER_SINCE, HEADER_SLOT, HEADER_VERSIONS
from throttle.keys import BucketKeys
from throttle.live import LiveLimits
from throttle.testing.windows import Segment, violations

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

APP = "tests.paths_app"


def starts(fleet: Fleet, tenant: str | None = None) -> list[float]:
    return [r["t"] for r in fleet.records() if tenant is None or r.get("tenant") == tenant]


def assert_promise(times: list[float], segments: list[Segment]) -> None:
    found = violations(times, segments, EPSILON_S)
    assert not found, f"{len(found)} windows over the limit, e.g. {found[0]}; starts {sorted(times)}"


def wait_finished(fleet: Fleet, count: int, timeout: float) -> list[str]:
    rec = redis.Redis.from_url(fleet.record_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and rec.llen(f"{fleet.record_key}:finished") < count:
            time.sleep(0.1)
        return [x.decode() if isinstance(x, bytes) else x for x in rec.lrange(f"{fleet.record_key}:finished", 0, -1)]
    finally:
        rec.close()


def redis_now(url: str) -> float:
    client = redis.Redis.from_url(url)
    try:
        seconds, micros = client.time()
        return seconds + micros / 1e6
    finally:
        client.close()


def test_retry_after_zero_defers_and_runs_again(fleet_factory: Any) -> None:
    """Point 1: ``RateLimited(retry_after=0)`` (a real ``Retry-After: 0``) is a deferral, never a failure.

    The bucket has tokens left when the 429 comes (burst 3, tasks one by
    one): a pause of 0 s leaves one, which the re-run may take at once.
    """
    fleet = fleet_factory(broker("redis"), {"paths": {"rate": "5/s", "burst": 3, "per_key": False}}, app_module=APP)
    ids = []
    for i in range(5):
        ids += fleet.send("fleet.paths", [(i, ["429:0", "ok"])])
        time.sleep(0.6)
    assert sorted(wait_finished(fleet, 5, 30)) == sorted(ids)
    assert fleet.counts("failed") == {}
    admitted = Counter(json.loads(x)["id"] for x in _list(fleet, "admissions"))
    assert admitted == dict.fromkeys(ids, 2), "one admission per body start, two starts each"
    assert_promise(starts(fleet), [Segment(0, 5, 3)])


def test_retry_pays_for_its_own_start(fleet_factory: Any) -> None:
    """Point 2: a retry carries the gate's headers; it must still take its own token."""
    fleet = fleet_factory(broker("redis"), {"paths": {"rate": "1/s", "burst": 1, "per_key": False}}, app_module=APP)
    fleet.send("fleet.paths", [(0, ["retry:0", "retry:0.2", "ok"]), (1, ["ok"])])
    assert len(wait_finished(fleet, 2, 30)) == 2
    times = starts(fleet)
    assert len(times) == 4
    assert_promise(times, [Segment(0, 1, 1)])  # was: starts at 0.0, 1.002 and 1.204 s


def test_retry_starts_a_fresh_deferral_count(fleet_factory: Any) -> None:
    """Point 2: a retry does not inherit the deferrals (nor the wait budget) of the run it retries."""
    fleet = fleet_factory(broker("redis"), {"paths": {"rate": "4/s", "burst": 1, "per_key": False}}, app_module=APP)
    ids = fleet.send("fleet.paths", [(i, ["retry:0", "ok"]) for i in range(4)])
    assert len(wait_finished(fleet, 4, 30)) == 4
    runs: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    for entry in _list(fleet, "admissions"):
        runs[json.loads(entry)["id"]].append(json.loads(entry))
    # The last task waited for three others before its first run, and was
    # deferred; its retry (sent with countdown 0 behind three more) starts
    # counting from zero again.
    deferred_first = [r[0]["deferrals"] for r in runs.values()]
    assert max(deferred_first) >= 1
    for admissions in runs.values():
        assert len(admissions) == 2
        assert admissions[1]["deferrals"] <= 1, admissions


def test_autoretry_for_exception_still_pauses_the_fleet(fleet_factory: Any) -> None:
    """Point 2: with ``autoretry_for=(Exception,)`` a RateLimited body pauses every worker, no retry spent."""
    fleet = fleet_factory(broker("redis"), {"paths": {"rate": "20/s", "burst": 5, "per_key": False}}, app_module=APP)
    ids = fleet.send("fleet.paths_auto", [(0, ["429:2", "ok"])])
    time.sleep(0.5)
    ids += fleet.send("fleet.paths_auto", [(i, ["ok"]) for i in range(1, 21)])
    assert len(wait_finished(fleet, 21, 40)) == 21
    pauses = [json.loads(x) for x in _list(fleet, "pauses")]
    assert len(pauses) == 1 and pauses[0]["seconds"] == 2
    paused_at = pauses[0]["t"]
    during = [t for t in starts(fleet) if paused_at + 0.6 < t < paused_at + 2 - EPSILON_S]
    assert during == [], "bodies ran inside the pause (0.6 s for the workers' live refresh and in-flight ones)"
    reruns = [r for r in fleet.records() if r["id"] == ids[0]]
    assert [r["retries"] for r in reruns] == [0, 0], "the 429 spent no retry"


def test_late_arrivals_forfeit_their_slot(fleet_factory: Any, redis_url: str) -> None:
    """Point 3: a worker busy while slots come due; late tasks book again instead of bunching up.

    Configured 1/s, raised live to 10/s; one pool slot, kept busy 0.9 s: the
    grace is a fixed tolerance, not the configured limit's interval (37
    starts in 100 ms before the fix).  10/s: slots 100 ms apart, more than
    the gate waits in place (SPIN_S), so tasks are deferred and come back.
    """
    fleet = fleet_factory(
        broker("redis"), {"paths": {"rate": "1/s", "burst": 1, "per_key": False}}, app_module=APP, workers=1,
        concurrency=1,
    )  # fmt: skip
    prefix = f"throttle-{fleet.queue}"
    client = redis.Redis.from_url(redis_url)
    try:
        LiveLimits(client, prefix).set("paths", rate="10/s")
        changed = LiveLimits(client, prefix).read().pending["paths"].at
    finally:
        client.close()
    time.sleep(1.2)  # the change is in force
    fleet.send("fleet.paths", [(0, ["ok"]), (1, ["sleep:0.9"])] + [(i, ["ok"]) for i in range(2, 32)])
    assert len(wait_finished(fleet, 32, 60)) == 32
    times = [t for t in starts(fleet) if t > changed]
    assert len(times) == 32
    assert_promise(times, [Segment(changed, 10, 1)])
    assert fleet.counts("deferred").get("late", 0) >= 1, "the busy slot made some tasks late"


def test_a_lowered_limit_takes_effect_everywhere_at_once(fleet_factory: Any, redis_url: str) -> None:
    """Live overrides down: from the moment the change takes effect no worker
    runs the old rate on (workers read the live state every 0.5 s; the change
    is scheduled 1 s ahead, so each switches at the same Redis time)."""
    fleet = fleet_factory(
        broker("redis"), {"paths": {"rate": "40/s", "burst": 5, "per_key": False}}, app_module=APP, workers=2,
        concurrency=3,
    )  # fmt: skip

    def feed() -> None:  # keep the bucket busy: 60 tasks a second for 4 s
        for round_ in range(40):
            fleet.send("fleet.paths", [(round_ * 6 + i, ["ok"]) for i in range(6)])
            time.sleep(0.1)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        time.sleep(1.5)
        client = redis.Redis.from_url(redis_url)
        try:
            live = LiveLimits(client, f"throttle-{fleet.queue}")
            live.set("paths", rate="4/s", burst=1)
            at = live.read().pending["paths"].at
        finally:
            client.close()
    finally:
        feeder.join()
    time.sleep(1.5)
    times = [t for t in starts(fleet) if t < at + 2.5]
    assert len([t for t in times if t < at]) > 40, "the old limit was busy before the change"
    assert_promise(times, [Segment(0, 40, 5), Segment(at, 4, 1)])


def test_slow_limit_has_a_small_grace(fleet_factory: Any) -> None:
    """Point 3: at 1/s burst 1, two tasks never start 0.1 s apart because one came late."""
    fleet = fleet_factory(
        broker("redis"), {"paths": {"rate": "1/s", "burst": 1, "per_key": False}}, app_module=APP, workers=1,
        concurrency=2,
    )  # fmt: skip
    # Two pool slots, bodies longer than the interval: slots at 1 s
    # intervals come due while both pool slots are busy.
    fleet.send("fleet.paths", [(0, ["sleep:1.9"])] + [(i, ["sleep:1.3"]) for i in range(1, 7)])
    assert len(wait_finished(fleet, 7, 60)) == 7
    assert_promise(starts(fleet), [Segment(0, 1, 1)])


def test_reset_of_one_key_voids_its_booked_slots(fleet_factory: Any, redis_url: str) -> None:
    """Point 4: ``throttle reset NAME --key T`` mid-backlog, more tasks after it:
    the slots booked before the reset are void, so the tenant never runs at
    twice its rate (old slots and the fresh bucket's, side by side)."""
    from throttle.cli import main as cli

    fleet = fleet_factory(broker("redis"), {"paths_tenant": {"rate": "1/s", "burst": 1}}, app_module=APP)
    fleet.send("fleet.paths_tenant", [(i, ["ok"], "acme") for i in range(6)])
    time.sleep(1.5)
    prefix = f"throttle-{fleet.queue}"
    assert cli(["--redis-url", redis_url, "--prefix", prefix, "reset", "paths_tenant", "--key", "acme"]) == 0
    reset_at = redis_now(redis_url)
    fleet.send("fleet.paths_tenant", [(i, ["ok"], "acme") for i in range(6, 12)])
    assert len(wait_finished(fleet, 12, 40)) == 12
    # One fresh burst at the reset, and 1/s before and after it.
    assert_promise(starts(fleet, "acme"), [Segment(0, 1, 1), Segment(reset_at, 1, 1)])


def test_forged_slot_headers_buy_nothing(fleet_factory: Any) -> None:
    """Point 5: a producer (or a copied message) sending throttle's headers still meets the bucket."""
    fleet = fleet_factory(broker("redis"), {"paths": {"rate": "1/m", "burst": 1, "per_key": False}}, app_module=APP)
    app = fleet.producer()
    forged = {
        HEADER_SLOT: time.time(),
        HEADER_DEFERRALS: 1,
        HEADER_SINCE: time.time(),
        HEADER_VERSIONS: "0",
        HEADER_RETRIES: 0,
    }
    with publishing(app) as producer:
        for i in range(10):
            app.send_task("fleet.paths", args=(i, ["ok"]), queue=fleet.queue, producer=producer, headers=forged)
    time.sleep(4)
    assert len(starts(fleet)) == 1, "one token, one start; the rest wait their turn (a minute each)"
    assert fleet.counts("deferred").get("unbooked", 0) >= 9


def test_a_retry_after_of_days_pauses_and_waits(fleet_factory: Any, redis_url: str) -> None:
    """Point 7: ``RateLimited(retry_after=2 days)`` pauses the limit for two days; the task waits, never fails."""
    fleet = fleet_factory(
        broker("redis"), {"paths": {"rate": "5/s", "burst": 1, "per_key": False}}, app_module=APP,
        extra_env={"THROTTLE_MAX_DEFER": str(30 * 86400)},
    )  # fmt: skip
    fleet.send("fleet.paths", [(0, ["429:172800", "ok"])])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not _list(fleet, "pauses"):
        time.sleep(0.1)
    time.sleep(1.0)
    assert fleet.counts("failed") == {}
    assert [json.loads(x)["seconds"] for x in _list(fleet, "pauses")] == [172800]
    client = redis.Redis.from_url(redis_url)
    try:
        marker = client.get(BucketKeys(f"throttle-{fleet.queue}", "paths").paused)
    finally:
        client.close()
    assert marker is not None and int(marker) / 1e6 - redis_now(redis_url) > 172700


def test_first_deferral_stamped_by_a_clock_ahead(fleet_factory: Any) -> None:
    """Point 7: ``throttle_since`` written by a host whose clock runs ahead does not fail the task."""
    fleet = fleet_factory(
        broker("redis"), {"paths": {"rate": "5/s", "burst": 1, "per_key": False}}, app_module=APP,
        extra_env={"THROTTLE_MAX_DEFER": str(30 * 86400)},
    )  # fmt: skip
    app = fleet.producer()
    ahead = {HEADER_DEFERRALS: 1, HEADER_SINCE: time.time() + 5, HEADER_RETRIES: 0}
    with publishing(app) as producer:
        for i in range(5):
            app.send_task("fleet.paths", args=(i, ["ok"]), queue=fleet.queue, producer=producer, headers=ahead)
    assert len(wait_finished(fleet, 5, 30)) == 5
    assert fleet.counts("failed") == {}


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_errors_reach_the_caller_whole(fleet_factory: Any, redis_url: str, serializer: str) -> None:
    """Point 6: ``AsyncResult.get()`` raises ``BackendUnavailable`` itself (was: a plain ``Exception``)."""
    from throttle import BackendUnavailable
    from throttle.testing.redis_server import free_port

    fleet = fleet_factory(
        broker("redis"), {}, app_module=APP, throttle_redis_url=f"redis://127.0.0.1:{free_port()}/0",
        extra_env={
            "THROTTLE_ON_BACKEND_ERROR": "fail", "RESULT_BACKEND": redis_url,
            "RESULT_SERIALIZER": serializer,
        },
    )  # fmt: skip
    app = fleet.producer()
    app.conf.result_backend = redis_url
    app.conf.result_accept_content = ["json", "pickle"]
    app.conf.result_serializer = serializer
    with publishing(app) as producer:
        result = app.send_task("fleet.paths", args=(0, ["ok"]), queue=fleet.queue, producer=producer)
    with pytest.raises(BackendUnavailable) as info:
        result.get(timeout=30)
    assert "live limits" in str(info.value) and "Connection" in str(info.value)
    result.forget()


def _list(fleet: Fleet, name: str) -> list[bytes]:
    rec = redis.Redis.from_url(fleet.record_url)
    try:
        return [x if isinstance(x, bytes) else x.encode() for x in rec.lrange(f"{fleet.record_key}:{name}", 0, -1)]
    finally:
        rec.close()
