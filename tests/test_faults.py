"""Faults at the bucket: failover to a replica, passwords, ACL users and TLS.

Each test starts the Redis servers it breaks; none touches another's.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from throttle import BackendUnavailable, TokenBucket
from throttle.celery.settings import ThrottleSettings
from throttle.testing.redis_server import RedisServer

pytestmark = pytest.mark.faults


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer().start()
    replica = RedisServer(extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    try:
        client = redis.Redis.from_url(replica.url)
        deadline = time.monotonic() + 20
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                pytest.fail("replica did not sync with its primary")
            time.sleep(0.05)
        yield primary, replica
    finally:
        replica.close()
        primary.close()


def test_failover_to_a_replica_keeps_the_state(primary_and_replica: tuple[RedisServer, RedisServer]) -> None:
    """Decisions replicate as plain SETs (effects), so a promoted replica knows
    the buckets up to the replication lag; clients pointed at it carry on."""
    primary, replica = primary_and_replica
    on_primary = TokenBucket(redis.Redis.from_url(primary.url), "failover", rate="1/m", burst=3)
    assert [on_primary.consume().allowed for _ in range(3)] == [True, True, True]
    # WAIT: the three writes reached the replica (what a failover can lose
    # is exactly what WAIT would not have confirmed).
    assert redis.Redis.from_url(primary.url).wait(1, 5000) == 1

    replica_client = redis.Redis.from_url(replica.url)
    on_replica = TokenBucket(replica_client, "failover", rate="1/m", burst=3)
    # Before promotion a replica can still refuse (a refusal writes nothing)
    # but cannot grant: a grant is a write, and that is "unavailable".
    assert not on_replica.consume().allowed
    with pytest.raises(BackendUnavailable) as info:
        TokenBucket(replica_client, "fresh", rate=1, burst=1).consume()
    assert isinstance(info.value.cause, redis.exceptions.ReadOnlyError)

    primary.kill()
    replica_client.replicaof("NO", "ONE")
    d = on_replica.consume()
    assert not d.allowed, "the promoted replica still knows the bucket is empty"
    assert 60 - 1 <= d.retry_after <= 60
    assert replica_client.pttl(on_replica.key) > 0


def test_password_and_acl_user(restartable_redis: RedisServer) -> None:
    admin = redis.Redis.from_url(restartable_redis.url)
    admin.config_set("requirepass", "s3cret-pw")
    with_password = redis.Redis.from_url(f"redis://:s3cret-pw@127.0.0.1:{restartable_redis.port}/0")
    assert TokenBucket(with_password, "pw", rate=1, burst=1).consume().allowed

    with_password.acl_setuser(
        "limiter", enabled=True, passwords=["+limiter-pw"], keys=["throttle:*"],
        commands=["+evalsha", "+eval", "+script|load", "+time", "+get", "+set", "+del", "+mget", "+ping"],
    )  # fmt: skip
    acl_user = redis.Redis.from_url(f"redis://limiter:limiter-pw@127.0.0.1:{restartable_redis.port}/0")
    bucket = TokenBucket(acl_user, "acl", rate="1/m", burst=1)
    assert bucket.consume().allowed
    assert not bucket.consume().allowed
    # The ACL confines the user to throttle's keys: a key outside is refused
    # (NOPERM: no decision can be made, so the gate's policy applies).
    outside = TokenBucket(acl_user, "acl", rate=1, burst=1, prefix="other")
    with pytest.raises(BackendUnavailable) as info:
        outside.consume()
    assert isinstance(info.value.cause, redis.exceptions.NoPermissionError)


def test_credentials_never_in_errors(restartable_redis: RedisServer) -> None:
    url = f"redis://user:hunter2-secret@127.0.0.1:{restartable_redis.port}/0"
    restartable_redis.stop()
    bucket = TokenBucket(redis.Redis.from_url(url, socket_connect_timeout=0.5), "k", rate=1, burst=1)
    with pytest.raises(BackendUnavailable) as info:
        bucket.consume()
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value)
    with pytest.raises(ValueError) as bad:
        ThrottleSettings.from_conf({"throttle_redis_url": "http://user:hunter2-secret@x/"})
    assert "hunter2" not in str(bad.value)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "redis.crt", directory / "redis.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = RedisServer(tls=(str(cert), str(key)))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"this redis-server does not serve TLS: {exc}")
    try:
        client = redis.Redis.from_url(server.url, ssl_ca_certs=str(cert))
        bucket = TokenBucket(client, "tls", rate="1/m", burst=1)
        assert bucket.consume().allowed
        assert not bucket.consume().allowed
        # The same through Celery settings: rediss:// plus redis-py options.
        settings = ThrottleSettings.from_conf(
            {"throttle_redis_url": server.url, "throttle_redis_options": {"ssl_ca_certs": str(cert)}}
        )
        assert redis.Redis.from_url(settings.redis_url, **settings.redis_options).ping()
        # Without trusting the certificate the client refuses to talk.
        untrusting = TokenBucket(redis.Redis.from_url(server.url, socket_connect_timeout=2), "tls", rate=1, burst=1)
        with pytest.raises(BackendUnavailable):
            untrusting.consume()
    finally:
        server.close()
