"""Redis refusing to answer is a backend error, whatever the reason (issue 12, point 8).

Out of memory (OOM), an ACL that forbids the script (NOPERM), a script
blocking the server (BUSY), a failed snapshot refusing writes (MISCONF), a
read-only replica (READONLY) and a server still loading (LOADING) all mean
"no decision can be made now": each becomes ``BackendUnavailable``, which the
Celery gate turns into its ``throttle_on_backend_error`` policy, instead of
failing the task as a bug would.  Each is produced on a real redis-server.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from throttle import BackendUnavailable, TokenBucket
from throttle._core import unavailable
from throttle.testing.redis_server import RedisServer


@pytest.fixture
def admin(restartable_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(restartable_redis.url)
    yield client
    client.close()


def _refused(client: redis.Redis, cause: type[Exception] | str) -> None:
    bucket = TokenBucket(client, "refused", rate="10/s", burst=2)
    with pytest.raises(BackendUnavailable) as info:
        bucket.consume()
    if isinstance(cause, str):
        assert str(info.value.cause).startswith(cause), info.value
    else:
        assert isinstance(info.value.cause, cause), info.value


def test_out_of_memory(admin: redis.Redis) -> None:
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        _refused(admin, redis.exceptions.OutOfMemoryError)
    finally:
        admin.config_set("maxmemory", 0)
    assert TokenBucket(admin, "refused", rate="10/s", burst=2).consume().allowed


def test_no_permission(admin: redis.Redis, restartable_redis: RedisServer) -> None:
    admin.acl_setuser("noscript", enabled=True, passwords=["+pw"], commands=["+@all", "-evalsha", "-eval"], keys=["*"])
    limited = redis.Redis.from_url(f"redis://noscript:pw@127.0.0.1:{restartable_redis.port}/0")
    try:
        _refused(limited, redis.exceptions.NoPermissionError)
    finally:
        limited.close()


def test_busy_script(admin: redis.Redis, restartable_redis: RedisServer) -> None:
    admin.config_set("busy-reply-threshold", 100)
    blocker = redis.Redis.from_url(restartable_redis.url)

    def block() -> None:
        with contextlib.suppress(redis.exceptions.RedisError):
            blocker.eval("local t = redis.call('TIME') while true do end", 0)

    thread = threading.Thread(target=block, daemon=True)
    thread.start()
    time.sleep(0.4)
    client = redis.Redis.from_url(restartable_redis.url)
    try:
        _refused(client, "BUSY")
    finally:
        for _ in range(50):
            with contextlib.suppress(redis.exceptions.RedisError):
                client.script_kill()
                break
            time.sleep(0.1)
        thread.join(10)
        client.close()
        blocker.close()


def test_failed_snapshot_refuses_writes() -> None:
    try:
        server = RedisServer(extra_args=["--enable-protected-configs", "yes"]).start()
    except RuntimeError:
        pytest.skip("this redis-server cannot change its dir at run time")
    admin = redis.Redis.from_url(server.url)
    try:
        admin.config_set("save", "3600 1")
        admin.config_set("stop-writes-on-bgsave-error", "yes")
        admin.config_set("dir", "/proc")  # no file can be created there, even by root
        with contextlib.suppress(redis.exceptions.ResponseError):
            admin.bgsave()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and admin.info("persistence")["rdb_last_bgsave_status"] != "err":
            time.sleep(0.05)
        if admin.info("persistence")["rdb_last_bgsave_status"] != "err":
            pytest.skip("this redis-server saved into /proc: MISCONF cannot be produced here")
        _refused(admin, "MISCONF")
    finally:
        admin.config_set("save", "")  # or the server refuses to shut down without its snapshot
        admin.close()
        server.close()


def test_read_only_replica(restartable_redis: RedisServer) -> None:
    with RedisServer(extra_args=["--replicaof", "127.0.0.1", str(restartable_redis.port)]) as replica:
        client = redis.Redis.from_url(replica.url)
        try:
            _refused(client, redis.exceptions.ReadOnlyError)
        finally:
            client.close()


def test_loading_and_auth_are_unavailable_too() -> None:
    # LOADING lasts as long as a large dataset loads at start: classified by type.
    assert unavailable(redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"))
    assert unavailable(redis.exceptions.AuthenticationError("WRONGPASS invalid username-password pair"))
    assert not unavailable(redis.exceptions.ResponseError("ERR wrong number of arguments"))
    assert not unavailable(redis.exceptions.NoScriptError("NOSCRIPT No matching script"))
