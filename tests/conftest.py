"""Fixtures: a private redis-server per test session, unique keys per test.

Tests never touch a Redis they did not start (the machine's own Redis on 6379
is used only as a Celery broker, on queue names unique to each test).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.engines import ENGINES, Engine
from throttle.testing.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session, on a free loopback port."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests share the server safely."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def restartable_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop, kill or restart."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, redis_url: str, prefix: str) -> Iterator[Engine]:
    """Each test that takes this runs once per engine: script, transaction, async."""
    eng = Engine(request.param, redis_url, prefix)
    yield eng
    eng.close()
