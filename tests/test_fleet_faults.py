"""Faults under a running fleet: Redis restarts, killed workers, a long soak.

Real worker processes, real brokers; the Redis servers that get broken are
started by the test itself.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.fleet import SYSTEM_REDIS_BROKER, Fleet, broker_available
from throttle.testing.redis_server import RedisServer
from throttle.testing.windows import peak_in_window

pytestmark = [pytest.mark.faults, pytest.mark.fleet, pytest.mark.slow]

LIMITS = {"api": {"rate": "20/s", "burst": 5}, "tenant": {"rate": "5/s", "burst": 1}}


@pytest.fixture
def fleets(redis_url: str) -> Iterator[list[Fleet]]:
    made: list[Fleet] = []
    yield made
    for fleet in made:
        fleet.stop()
        fleet.purge()


def start(fleets: list[Fleet], record_url: str, **kwargs: Any) -> Fleet:
    if not broker_available(kwargs.get("broker_url", SYSTEM_REDIS_BROKER)):
        pytest.skip("no Redis broker on 127.0.0.1:6379")
    options = {"broker_url": SYSTEM_REDIS_BROKER, "record_url": record_url, "limits": LIMITS, **kwargs}
    fleet = Fleet(**options)
    fleets.append(fleet)
    return fleet.start()


def test_bucket_redis_restart_mid_run(fleets: list[Fleet], redis_url: str, restartable_redis: RedisServer) -> None:
    """Nothing lost, nothing run twice; after the restart the limit holds again,
    from a fresh (full) bucket: at most one extra burst."""
    fleet = start(fleets, redis_url, throttle_redis_url=restartable_redis.url)
    ids = fleet.send("fleet.work", [(i,) for i in range(120)])
    fleet.wait_for_records(30, timeout=60)
    restarted_at = time.time()
    restartable_redis.restart()
    records = fleet.wait_for_records(120, timeout=120)
    ran = Counter(r["id"] for r in records)
    assert set(ran) == set(ids) and max(ran.values()) == 1
    after = sorted(r["t"] for r in records if r["t"] > restarted_at)
    assert after, "work went on after the restart"
    # A restart forgets the bucket: it is full again, so one more burst (5)
    # may pass on top of the tasks that had booked their slots already.
    assert peak_in_window(after) <= 25 + 5
    assert peak_in_window([t for t in after if t > restarted_at + 2]) <= 25


def test_broker_redis_restart_mid_run(fleets: list[Fleet], redis_url: str) -> None:
    """The broker's Redis restarts (with its append-only file) while deferred
    tasks wait in the workers: no task is lost, a task runs twice only if its
    early ack was lost in the restart itself, and the limit holds throughout.

    kombu 5.7's worker exits on this fault (AttributeError in the channel's
    close while the server is down) and leaves the messages it held in the
    broker's ``unacked`` hash; a supervisor starts it again and kombu hands
    those messages out again after the visibility timeout (10 s here)."""
    broker = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"]).start()
    try:
        fleet = start(
            fleets, redis_url, broker_url=broker.url, throttle_redis_url=redis_url, workers=2,
            extra_env={"BROKER_VISIBILITY_TIMEOUT": "10"},
        )  # fmt: skip
        ids = fleet.send("fleet.work", [(i,) for i in range(100)])
        fleet.wait_for_records(20, timeout=60)
        restart_began = time.time()
        broker.restart()
        restart_ended = time.time()
        deadline = time.monotonic() + 120
        revived = 0
        while len(fleet.records()) < len(ids) and time.monotonic() < deadline:
            revived += fleet.revive()
            time.sleep(0.5)
        records = fleet.records()
        ran = Counter(r["id"] for r in records)
        missing = set(ids) - set(ran)
        assert not missing, f"{len(missing)} tasks never ran (workers revived {revived} times): see {fleet.log_dir}"
        twice = [i for i, n in ran.items() if n > 1]
        first_run = {r["id"]: r["t"] for r in reversed(records)}
        assert all(restart_began - 1 <= first_run[i] <= restart_ended + 1 for i in twice), twice
        assert peak_in_window([r["t"] for r in records]) <= 25
        print(f"broker restart: revived {revived} workers, {len(twice)} ran twice, "
              f"last task {max(r['t'] for r in records) - restart_ended:.1f}s after the restart")  # fmt: skip
    finally:
        broker.close()


def test_worker_killed_mid_task_runs_again(fleets: list[Fleet], redis_url: str) -> None:
    """acks_late + reject_on_worker_lost: a task whose process is SIGKILLed
    runs again in another process; its first token is not refunded."""
    fleet = start(fleets, redis_url, throttle_redis_url=redis_url, workers=2)
    [task_id] = fleet.send("fleet.slow_work", [(0, 3.0)])
    first = fleet.wait_for_records(1, timeout=60)[0]
    assert first["phase"] == "start"
    os.kill(first["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    records = fleet.records()
    while not any(r.get("phase") == "end" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = fleet.records()
    starts = [r for r in records if r["id"] == task_id and r["phase"] == "start"]
    ends = [r for r in records if r["id"] == task_id and r["phase"] == "end"]
    assert len(starts) == 2 and len(ends) == 1
    assert starts[1]["pid"] != first["pid"]
    # Both deliveries paid a token: the limit errs on the safe side.
    assert fleet.counts("admitted").get("now", 0) + fleet.counts("admitted").get("booked", 0) == 2


def test_soak_ten_thousand_tasks(fleets: list[Fleet], redis_url: str, tmp_path: Any) -> None:
    """10,000 tasks, 8 worker processes, the mock API enforcing the same limit:
    every task reaches the API exactly once, no 429, the peak within the limit,
    and no bucket key outlives its refill."""
    import sys

    from tests.fleet import ROOT
    from throttle.testing.processes import Children
    from throttle.testing.redis_server import free_port
    from throttle.testing.windows import peak_in_window

    rate, burst, tasks = 50, 10, 10_000
    api_port = free_port()
    bucket_server = RedisServer().start()
    children = Children(tmp_path / "logs")
    try:
        children.spawn(
            "api",
            [sys.executable, "-m", "worker.mock_api", "--port", str(api_port), "--rate", f"{rate}/s",
             "--burst", str(burst), "--mode", "window"],
            dict(os.environ), cwd=ROOT,
        )  # fmt: skip
        bucket = redis.Redis.from_url(bucket_server.url)
        baseline_keys = bucket.dbsize()
        baseline_memory = bucket.info("memory")["used_memory"]
        fleet = start(
            fleets, redis_url, throttle_redis_url=bucket_server.url, workers=4, concurrency=2,
            limits={**LIMITS, "api": {"rate": f"{rate}/s", "burst": burst}},
            # Countdowns only (its scope since it was written); the waiting
            # room's keys are checked in tests/test_room.py.
            extra_env={"API_URL": f"http://127.0.0.1:{api_port}", "THROTTLE_PARK_AFTER": "off"},
            app_module="worker.app",
        )  # fmt: skip
        started = time.monotonic()
        ids = fleet.send("worker.call_api", [(i,) for i in range(tasks)])
        import json
        import urllib.request

        def stats() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/stats", timeout=10) as response:
                data: dict[str, Any] = json.loads(response.read())
                return data

        deadline = started + 540
        while stats()["task_ids_ok"] < tasks and time.monotonic() < deadline:
            time.sleep(2)
        elapsed = time.monotonic() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/requests", timeout=30) as response:
            requests = json.loads(response.read())
        ok = Counter(r["task_id"] for r in requests if r["status"] == 200)
        assert set(ok) == set(ids), f"{len(set(ids) - set(ok))} tasks never reached the API in {elapsed:.0f}s"
        assert max(ok.values()) == 1, "a task called the API twice"
        assert sum(1 for r in requests if r["status"] == 429) == 0
        assert peak_in_window([r["t"] for r in requests]) <= rate + burst
        # Every bucket key expires when its bucket is full again (1/5 s here);
        # no key at all is left without a TTL.
        time.sleep(1.0)
        keys = list(bucket.scan_iter(count=1000))
        # Left: the demo counters, the metrics and the published config (all
        # with a TTL); no bucket.
        kept = (b":~demo:stats", b":~metrics:", b":~{live}:configured")
        assert [k for k in keys if not any(part in k for part in kept)] == [], keys[:10]
        assert all(bucket.ttl(k) > 0 for k in keys)
        assert baseline_keys == 0
        # Memory back near the baseline once the workers' connections are
        # gone: no key is left but the demo counters (which expire in a day);
        # what remains is the script cache and the allocator's own (measured
        # here: +0.3 MB after 10,000 tasks).
        fleet.stop()
        deadline = time.monotonic() + 10
        while bucket.info("clients")["connected_clients"] > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        used = bucket.info("memory")["used_memory"]
        print(f"soak: used_memory {used} bytes, baseline {baseline_memory}")
        assert used < baseline_memory + 512 * 1024, f"used_memory {used} vs baseline {baseline_memory}"
        print(f"soak: {tasks} tasks in {elapsed:.0f}s, {len(requests)} API calls")
    finally:
        children.stop_all()
        bucket_server.close()
