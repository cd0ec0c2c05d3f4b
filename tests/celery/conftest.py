"""Fixtures for fleets of real ``celery worker`` processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.fleet import SYSTEM_RABBITMQ_BROKER, SYSTEM_REDIS_BROKER, Fleet, broker_available

BROKERS = {"redis": SYSTEM_REDIS_BROKER, "rabbitmq": SYSTEM_RABBITMQ_BROKER}


def broker(name: str) -> str:
    """The machine's broker of that kind; the test is skipped if it does not answer."""
    url = BROKERS[name]
    if not broker_available(url):
        pytest.skip(f"no {name} broker answers at {url}")
    return url


#: Every task of the fleet apps needs its limit configured, or the worker
#: refuses to start (as it should); tests override what they use.
DEFAULT_LIMITS = {
    "api": {"rate": "20/s", "burst": 5},
    "tenant": {"rate": "5/s", "burst": 1},
    "paths": {"rate": "10/s", "burst": 1, "per_key": False},
    "paths_tenant": {"rate": "5/s", "burst": 1},
}


#: Every limit ``tests.concurrency_app``'s tasks name; tests and benches
#: start from these and override what they measure.
CONCURRENCY_LIMITS = {
    "slots": {"concurrency": 3},
    "slots_rated": {"rate": "10/s", "burst": 1, "concurrency": 3},
    "rate_only": {"rate": "10/s", "burst": 1},
    "tenant_slots": {"concurrency": 2},
    "slots_b": {"concurrency": 1},
}


@pytest.fixture
def fleet_factory(redis_url: str) -> Iterator[Any]:
    fleets: list[Fleet] = []

    def make(broker: str, limits: dict[str, Any], throttle_redis_url: str = redis_url, **kwargs: Any) -> Fleet:
        fleet = Fleet(broker, throttle_redis_url, redis_url, {**DEFAULT_LIMITS, **limits}, **kwargs)
        fleets.append(fleet)
        return fleet.start()

    yield make
    for fleet in fleets:
        fleet.stop()
        fleet.purge()
