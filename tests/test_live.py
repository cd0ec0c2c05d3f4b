"""Operating a running fleet: ``throttle set``, ``pause``/``resume``, shadow
mode and the metrics endpoint, against real workers that are never restarted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.fleet import ROOT, SYSTEM_REDIS_BROKER, Fleet, broker_available
from throttle.keys import stats_key
from throttle.testing.redis_server import free_port
from throttle.testing.windows import peak_in_window

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

SCRIPT = str(Path(sys.executable).parent / "throttle")


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    made: list[Fleet] = []
    yield made
    for fleet in made:
        fleet.stop()
        fleet.purge()


def start(fleets: list[Fleet], redis_url: str, limits: dict[str, Any], **kwargs: Any) -> Fleet:
    if not broker_available(SYSTEM_REDIS_BROKER):
        pytest.skip("no Redis broker on 127.0.0.1:6379")
    fleet = Fleet(SYSTEM_REDIS_BROKER, redis_url, redis_url, limits=limits, **kwargs)
    fleets.append(fleet)
    return fleet.start()


def cli(fleet: Fleet, *args: str) -> str:
    env = {**os.environ, "THROTTLE_REDIS_URL": fleet.throttle_redis_url, "THROTTLE_PREFIX": f"throttle-{fleet.queue}"}
    out = subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def send_steadily(fleet: Fleet, per_second: float, seconds: float, first: int = 0) -> list[str]:
    """``fleet.work`` tasks at a steady pace, as a live producer would."""
    ids: list[str] = []
    started = time.monotonic()
    n = int(per_second * seconds)
    for i in range(n):
        ids += fleet.send("fleet.work", [(first + i,)])
        pause = started + (i + 1) / per_second - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return ids


def redis_now(url: str) -> float:
    seconds, micros = redis.Redis.from_url(url).time()
    return seconds + micros / 1e6


def count_between(times: list[float], start: float, end: float) -> int:
    return sum(1 for t in times if start <= t < end)


def test_set_changes_the_rate_within_two_seconds(fleets: list[Fleet], redis_url: str) -> None:
    """5/s, then ``throttle set api --rate 20/s --burst 5`` while tasks keep coming
    at 25/s: within 2 s the fleet runs 20/s; no worker restarted, no task lost."""
    limits = {"api": {"rate": "5/s", "burst": 1, "per_key": False}, "tenant": {"rate": "5/s", "burst": 1}}
    fleet = start(fleets, redis_url, limits)
    pids = [p.pid for p in fleet.processes]
    ids: list[str] = []
    producer = threading.Thread(target=lambda: ids.extend(send_steadily(fleet, 25, 14)))
    producer.start()
    time.sleep(6)
    changed_at = redis_now(redis_url)
    assert "20/s burst 5" in cli(fleet, "set", "api", "--rate", "20/s", "--burst", "5")
    producer.join()
    records = fleet.wait_for_records(len(ids), timeout=120)
    times = sorted(r["t"] for r in records)
    ran = Counter(r["id"] for r in records)
    assert set(ran) == set(ids) and max(ran.values()) == 1
    assert [p.pid for p in fleet.processes] == pids and all(p.poll() is None for p in fleet.processes)
    before = [t for t in times if t < changed_at]
    assert peak_in_window(before[5:]) <= 5 + 1  # the old limit held
    # From 2 s after the change: the new rate, 20/s (a 4 s window: 80, +-10 %).
    after = count_between(times, changed_at + 2, changed_at + 6)
    print(f"live set: {count_between(times, changed_at - 4, changed_at) / 4:.1f}/s before, {after / 4:.1f}/s after")
    assert 72 <= after <= 88 + 5, after
    assert peak_in_window([t for t in times if t >= changed_at]) <= 20 + 5 + 5  # + one fresh burst at the change
    assert fleet.counts("deferred").get("changed", 0) > 0  # slots booked at 5/s were booked again


def test_pause_stops_bodies_within_a_second(fleets: list[Fleet], redis_url: str) -> None:
    limits = {"api": {"rate": "20/s", "burst": 5, "per_key": False}, "tenant": {"rate": "5/s", "burst": 1}}
    fleet = start(fleets, redis_url, limits)
    ids = fleet.send("fleet.work", [(i,) for i in range(200)])
    fleet.wait_for_records(40, timeout=60)
    paused_at = redis_now(redis_url)
    cli(fleet, "pause", "api", "--for", "60s")
    time.sleep(5)
    resumed_at = redis_now(redis_url)
    cli(fleet, "resume", "api")
    records = fleet.wait_for_records(len(ids), timeout=120)
    times = sorted(r["t"] for r in records)
    ran = Counter(r["id"] for r in records)
    assert set(ran) == set(ids) and max(ran.values()) == 1, "no task lost, none twice"
    during = count_between(times, paused_at + 1, resumed_at)
    assert during == 0, f"{during} bodies ran more than 1 s into the pause"
    first_after = min(t for t in times if t >= resumed_at)
    print(f"pause: last body {max(t for t in times if t < resumed_at) - paused_at:.2f}s after the pause, "
          f"first {first_after - resumed_at:.2f}s after the resume")  # fmt: skip
    assert first_after - resumed_at < 5  # waiting tasks look again every 2 s
    assert peak_in_window([t for t in times if t >= resumed_at]) <= 20 + 5
    assert fleet.counts("deferred").get("paused", 0) > 0


def test_shadow_mode_counts_but_never_defers(fleets: list[Fleet], redis_url: str) -> None:
    limits = {"api": {"rate": "5/s", "burst": 1, "per_key": False, "mode": "shadow"}, "tenant": "5/s"}
    fleet = start(fleets, redis_url, limits)
    ids = fleet.send("fleet.work", [(i,) for i in range(60)])
    records = fleet.wait_for_records(len(ids), timeout=60)
    times = sorted(r["t"] for r in records)
    assert len(records) == 60
    assert fleet.counts("deferred") == {}, "shadow mode deferred a task"
    span = times[-1] - times[0]
    allowed = 1 + 5 * span  # what the limit would have let through meanwhile
    assert peak_in_window(times) > 5 + 1, "the load exceeded the limit"
    time.sleep(2.5)  # metrics reach Redis once a second
    info = json.loads(cli(fleet, "inspect", "api", "--json"))["api"]
    refused = info["metrics"]["shadow_refused"]
    print(f"shadow: 60 tasks in {span:.2f}s, {refused:.0f} would have been deferred")
    assert info["metrics"]["admitted"] == 60
    assert 60 - allowed - 2 <= refused <= 60 - 1


def test_metrics_match_the_api_counts(fleets: list[Fleet], redis_url: str, tmp_path: Any) -> None:
    """Scraped during a fleet run of the reference worker against the mock API:
    admitted = requests the API saw; deferred = what the workers' signals counted."""
    from throttle.testing.processes import Children

    api_port, metrics_port = free_port(), free_port()
    children = Children(tmp_path / "logs")
    try:
        children.spawn(
            # The promise is about body starts: burst + rate x epsilon (50 ms) = 5 + 1.  The API
            # judges request *arrivals*, which the HTTP call itself delays by a varying amount on a
            # loaded host (a CI run on Python 3.13 saw arrivals bunched by ~150 ms: two 429s at
            # burst 6); this test is about the metrics, so the API allows 100 ms more: 5 + 3.
            "api", [sys.executable, "-m", "worker.mock_api", "--port", str(api_port), "--rate", "20/s", "--burst", "8"],
            dict(os.environ), cwd=ROOT,
        )  # fmt: skip
        limits = {"api": {"rate": "20/s", "burst": 5}}
        fleet = start(
            fleets, redis_url, limits, app_module="worker.app", extra_env={"API_URL": f"http://127.0.0.1:{api_port}"}
        )
        env = {**os.environ, "THROTTLE_REDIS_URL": redis_url, "THROTTLE_PREFIX": f"throttle-{fleet.queue}"}
        children.spawn("metrics", [SCRIPT, "metrics", "--port", str(metrics_port), "--host", "127.0.0.1"], env,
                       cwd=ROOT)  # fmt: skip

        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                text = response.read().decode()
            totals: dict[str, float] = {}
            for line in text.splitlines():
                m = re.match(r'^(throttle_\w+)_total\{limit="api"[^}]*\} ([0-9.e+]+)$', line)
                if m:
                    totals[m[1]] = totals.get(m[1], 0.0) + float(m[2])
            return totals

        def api_stats() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/stats", timeout=10) as response:
                data: dict[str, Any] = json.loads(response.read())
                return data

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                scrape()
                break
            except OSError:
                time.sleep(0.2)
        fleet.send("worker.call_api", [(i,) for i in range(120)])
        time.sleep(3)
        during = scrape()
        assert during.get("throttle_admitted", 0) > 0 and during.get("throttle_deferred", 0) > 0, during
        deadline = time.monotonic() + 90
        while api_stats()["task_ids_ok"] < 120 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.5)  # one flush interval and more
        final = scrape()
        api = api_stats()
        stats = redis.Redis.from_url(redis_url).hgetall(stats_key(f"throttle-{fleet.queue}"))
        deferred_by_signals = int(stats.get(b"deferred", 0))
        print(f"metrics: admitted {final['throttle_admitted']:.0f} (API saw {api['requests']}), deferred "
              f"{final['throttle_deferred']:.0f} (signals counted {deferred_by_signals})")  # fmt: skip
        assert api["http_429"] == 0
        assert final["throttle_admitted"] == api["requests"] == 120
        assert final["throttle_deferred"] == deferred_by_signals > 0
    finally:
        children.stop_all()
