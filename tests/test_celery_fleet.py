"""Real worker fleets sharing one limit: the acceptance tests of ThrottledTask.

Workers are real ``celery worker`` processes (prefork unless stated) on a
queue of their own; the broker is the machine's Redis or RabbitMQ; the
buckets live in the test session's private redis-server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fleet import SYSTEM_RABBITMQ_BROKER, SYSTEM_REDIS_BROKER, Fleet, broker_available

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

BROKERS = {"redis": SYSTEM_REDIS_BROKER, "rabbitmq": SYSTEM_RABBITMQ_BROKER}


def _broker(name: str) -> str:
    url = BROKERS[name]
    if not broker_available(url):
        pytest.skip(f"no {name} broker answers at {url}")
    return url


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any half-open window of ``window`` seconds."""
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.fixture
def fleet_factory(redis_url: str) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(broker: str, limits: dict[str, Any], **kwargs: Any) -> Fleet:
        # Every task of tests.fleet_app needs its limit configured, or the
        # worker refuses to start (as it should).
        limits = {"api": {"rate": "20/s", "burst": 5}, "tenant": {"rate": "5/s", "burst": 1}, **limits}
        fleet = Fleet(broker, redis_url, redis_url, limits, **kwargs)
        fleets.append(fleet)
        return fleet.start()

    yield make
    for fleet in fleets:
        fleet.stop()
        fleet.purge()


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
    assert max_in_window(starts) <= 25, "at most rate + burst bodies in any 1 s"
    assert starts[-1] - starts[0] <= 10.5, "slot booking uses the limit (ideal 9.75 s)"
    assert all(r["retries"] == 0 for r in records), "deferrals never spend the retry budget"
    deferred = sum(fleet.counts("deferred").values())
    assert deferred / 200 <= 1.2, f"{deferred} deferrals for 200 tasks"
