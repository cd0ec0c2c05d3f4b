"""Sentinel: one master, one replica and one sentinel, started here; the
master is killed and decisions resume on the promoted replica."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from throttle import BackendUnavailable, TokenBucket
from throttle.celery.settings import ThrottleSettings
from throttle.connect import client_from_url, close_client
from throttle.testing.redis_server import RedisServer, find_redis_server, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.slow]


@contextlib.contextmanager
def sentinel_for(master_port: int) -> Iterator[int]:
    """A redis-server in sentinel mode watching the master on ``master_port``."""
    binary, _ = find_redis_server()
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="throttle-sentinel-"))
    conf = workdir / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 10000\n"
    )
    proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.1)
        client.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_decisions_resume_after_failover() -> None:
    master = RedisServer().start()
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(master.port)]).start()
    clients: list[Any] = []
    try:
        with sentinel_for(master.port) as sentinel_port:
            url = f"redis+sentinel://127.0.0.1:{sentinel_port}/mymaster/0"
            # The same URL is accepted as a Celery setting.
            assert ThrottleSettings.from_conf({"throttle_redis_url": url}).redis_url == url
            client = client_from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
            clients.append(client)
            bucket = TokenBucket(client, f"sentinel-{uuid.uuid4().hex[:6]}", rate="1/m", burst=5)
            on_replica = redis.Redis(port=replica.port)
            clients.append(on_replica)
            deadline = time.monotonic() + 20
            while on_replica.info("replication").get("master_link_status") != "up":
                assert time.monotonic() < deadline, "the replica never synced"
                time.sleep(0.1)
            assert bucket.consume().allowed
            # The replica has the decision (WAIT), then the master dies.
            with redis.Redis(port=master.port) as on_master:
                assert on_master.wait(1, 5000) == 1
            master.kill()
            started = time.monotonic()
            resumed = None
            errors = 0
            while time.monotonic() - started < 60:
                try:
                    decision = bucket.consume()
                except BackendUnavailable:
                    errors += 1
                    time.sleep(0.2)
                    continue
                resumed = time.monotonic() - started
                break
            assert resumed is not None, "no decision within 60 s of the master's death"
            assert decision.allowed
            assert on_replica.info("replication")["role"] == "master"
            print(f"sentinel: decisions resumed {resumed:.1f}s after the master died ({errors} refused meanwhile)")
            # The promoted replica knew the bucket (replicated SETs): 5 - 2 tokens.
            assert bucket.peek().remaining == 3
    finally:
        for opened in clients:
            close_client(opened)
        replica.close()
        master.close()


def test_bad_sentinel_urls() -> None:
    for url, message in [
        ("redis+sentinel://127.0.0.1:26379", "service_name"),
        ("redis+sentinel://127.0.0.1:26379/a/b/c", "service_name"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/x", "service_name"),
        ("redis+sentinel:///mymaster", "host:port"),
        ("redis+sentinel://host:notaport/mymaster", "host:port"),
        ("redis+sentinel://:secret@127.0.0.1:99999/m", "host:port"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            client_from_url(url)
        assert "secret" not in str(info.value)


def test_a_sentinel_broker_url_finds_the_master() -> None:
    """kombu's ``sentinel://`` broker URL with ``master_name`` in the transport
    options: without throttle_redis_url, the buckets use that master."""
    with RedisServer() as master, sentinel_for(master.port) as sentinel_port:
        settings = ThrottleSettings.from_conf(
            {
                "broker_url": f"sentinel://127.0.0.1:{sentinel_port};sentinel://127.0.0.1:{free_port()}",
                "broker_transport_options": {"master_name": "mymaster", "socket_timeout": 2.0},
            }
        )
        assert settings.redis_options["socket_timeout"] == 2.0
        client = client_from_url(settings.redis_url, **settings.redis_options)
        try:
            bucket = TokenBucket(client, f"sentinel-{uuid.uuid4().hex[:6]}", rate="1/m", burst=1)
            assert bucket.consume().allowed and not bucket.consume().allowed
            with redis.Redis(port=master.port) as on_master:
                assert on_master.exists(bucket.key) == 1, "the decision was made on the master"
        finally:
            close_client(client)
