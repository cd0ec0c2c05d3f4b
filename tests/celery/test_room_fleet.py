"""The waiting room with real workers: long waits park in Redis, the fleet releases them.

Workers park any wait longer than ``throttle_park_after`` (5 s here, so the
test is short) and every worker releases what is due.  What users need:

- a backlog parks (it is not held by the workers), a live raise drains it at
  once, each task runs exactly once and the limit in force holds throughout;
- one tenant's backlog does not hold up another tenant of the same limit;
- a paused limit keeps its room shut until it is resumed;
- a releaser that published and died before acknowledging (so the entry is
  published twice) still runs each task once.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import redis
from celery import Celery

from tests.celery.conftest import broker
from tests.celery.test_paths import wait_finished
from tests.fleet import Fleet, publishing
from throttle.celery import EPSILON_S
from throttle.celery.release import Releaser
from throttle.live import LiveLimits
from throttle.metrics import read_metrics
from throttle.room import WaitingRoom
from throttle.testing.windows import Segment, violations

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

APP = "tests.paths_app"
PARK_AFTER = {"THROTTLE_PARK_AFTER": "5"}


def finished(fleet: Fleet, expected: int, timeout: float) -> Counter[str]:
    return Counter(wait_finished(fleet, expected, timeout))


def wait_parked(room: WaitingRoom, name: str, at_least: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    parked = 0
    while time.monotonic() < deadline:
        parked = sum(s.parked for s in room.stats(room.rooms(name)))
        if parked >= at_least:
            break
        time.sleep(0.2)
    return parked


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.mark.parametrize("broker_name", ["redis", "rabbitmq"])
def test_backlog_parks_then_a_raise_drains_it_once(fleet_factory: Any, redis_url: str, broker_name: str) -> None:
    limits = {"paths": {"rate": "2/s", "burst": 1, "per_key": False}, "paths_tenant": {"rate": "2/s", "burst": 1}}
    # Waits over 20 s park: the rooms' first releases are 18 s away when the
    # limit is raised, so only a re-plan on the change itself drains them at once.
    park_after = {"THROTTLE_PARK_AFTER": "20"}
    fleet = fleet_factory(broker(broker_name), limits, app_module=APP, workers=2, concurrency=2, extra_env=park_after)
    prefix = f"throttle-{fleet.queue}"
    client = redis.Redis.from_url(redis_url)
    room, live = WaitingRoom(client, prefix), LiveLimits(client, prefix)
    try:
        backlog = fleet.send("fleet.paths", [(n, ["ok"]) for n in range(200)])
        tenant_backlog = fleet.send("fleet.paths_tenant", [(1000 + n, ["ok"], "acme") for n in range(100)])
        # Most of each backlog parks (slots more than 20 s away): in Redis, not in the workers.
        assert wait_parked(room, "paths", 150, timeout=60) >= 150
        assert wait_parked(room, "paths_tenant", 55, timeout=30) >= 55
        # Another tenant of the same limit flows while acme's backlog waits.
        sent = time.monotonic()
        other = fleet.send("fleet.paths_tenant", [(2000 + n, ["ok"], "globex") for n in range(3)])
        done = finished(fleet, 0, 0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(done[i] for i in other) < 3:
            time.sleep(0.2)
            done = finished(fleet, 0, 0)
        assert sum(done[i] for i in other) == 3, "globex waited behind acme's backlog"
        assert time.monotonic() - sent < 15
        # Raise both limits: the rooms are re-planned and drain at once.
        raised_at = time.monotonic()
        live.set("paths", rate="50/s", burst=5)
        change_at = live.read().pending["paths"].at
        live.set("paths_tenant", rate="50/s", burst=5)
        # The rooms are re-planned when the change takes effect and empty within seconds.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum(s.parked for s in room.stats(room.rooms())) > 0:
            time.sleep(0.2)
        emptied_in = time.monotonic() - raised_at
        total = len(backlog) + len(tenant_backlog) + len(other)
        done = finished(fleet, total, timeout=90)
        drained_in = time.monotonic() - raised_at
    finally:
        client.close()
    assert fleet.counts("failed") == {}
    assert sum(done.values()) == total and max(done.values()) == 1, "each task exactly once"
    # 300 tasks at 2/s would take 100-150 s; at 50/s the rest drains in seconds.
    assert drained_in < 45, f"drained in {drained_in:.1f}s after the raise"
    assert emptied_in < 10, f"the rooms emptied {emptied_in:.1f}s after the raise (a re-plan on the change: ~3 s)"
    starts = [r["t"] for r in fleet.records() if r["task"] == "fleet.paths"]
    found = violations(starts, [Segment(0.0, 2.0, 1), Segment(change_at, 50.0, 5)], EPSILON_S)
    assert not found, f"{len(found)} windows over the limit in force, e.g. {found[0]}"
    assert fleet.counts("deferred").get("changed", 0) > 0, "released tasks booked again under the raised limit"


def test_a_paused_limit_keeps_its_room_shut(fleet_factory: Any, redis_url: str) -> None:
    limits = {"paths": {"rate": "2/s", "burst": 1, "per_key": False}}
    fleet = fleet_factory(broker("redis"), limits, app_module=APP, workers=2, concurrency=2, extra_env=PARK_AFTER)
    prefix = f"throttle-{fleet.queue}"
    client = redis.Redis.from_url(redis_url)
    room, live = WaitingRoom(client, prefix), LiveLimits(client, prefix)
    try:
        fleet.send("fleet.paths", [(n, ["ok"]) for n in range(40)])
        assert wait_parked(room, "paths", 20, timeout=30) >= 20
        live.pause("paths", 3600)
        paused_at = redis_now(client)
        live.set("paths", rate="100/s", burst=10)  # a raise while paused: still shut
        time.sleep(6)
        shut = [r for r in fleet.records() if r["t"] > paused_at + 1.0]
        parked = sum(s.parked for s in room.stats(room.rooms("paths")))
        live.resume("paths")
        done = finished(fleet, 40, timeout=40)
    finally:
        client.close()
    assert shut == [], f"{len(shut)} bodies ran while the limit was paused"
    assert parked >= 20, "the parked tasks stayed in the room"
    assert sum(done.values()) == 40 and max(done.values()) == 1


def test_a_release_published_twice_runs_once(fleet_factory: Any, redis_url: str) -> None:
    """A releaser publishes a claim's entries and dies before acknowledging them:
    the claim expires, a worker's releaser publishes them again; each task runs once."""
    limits = {"paths": {"rate": "2/s", "burst": 1, "per_key": False}}
    fleet = fleet_factory(broker("redis"), limits, app_module=APP, workers=2, concurrency=2, extra_env=PARK_AFTER)
    prefix = f"throttle-{fleet.queue}"
    app = Celery("dying-releaser", broker=fleet.broker_url)
    app.conf.update(throttle_redis_url=redis_url, throttle_prefix=prefix, task_default_queue=fleet.queue)
    releaser = Releaser(app)
    room = releaser.room
    fleet.send("fleet.paths", [(n, ["ok"]) for n in range(30)])
    assert wait_parked(room, "paths", 10, timeout=30) >= 10
    # The dying releaser: claims what is due within a minute, for 1 s, publishes, never acknowledges.
    claim = room.claim("paths", ahead=60.0, hold=1.0, limit=100)
    assert len(claim.parked) >= 10
    with publishing(app) as producer:
        for parked in claim.parked:
            assert releaser.publish("paths", parked, claim.now, producer)
    done = finished(fleet, 30, timeout=60)
    time.sleep(3)  # late second copies would show here
    done = finished(fleet, 30, timeout=0)
    client = redis.Redis.from_url(redis_url)
    try:
        duplicates = read_metrics(client, prefix, ["paths"])["paths"].get("duplicates", 0)
    finally:
        client.close()
        app.close()
    assert sum(done.values()) == 30 and max(done.values()) == 1, "each task exactly once"
    assert duplicates == len(claim.parked), "every second copy was dropped by the gate"
