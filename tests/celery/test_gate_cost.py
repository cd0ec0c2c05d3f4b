"""The gate's price when tokens are there: one Redis round trip per task.

A worker runs no-op tasks behind a limit far above the load; the bucket's
Redis (started here, used by nothing else) counts every command it serves.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.fleet import SYSTEM_REDIS_BROKER, Fleet, broker_available
from throttle.testing.redis_server import RedisServer

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

#: What a new connection sends (redis-py's handshake) and health checks.
HANDSHAKE = {"client|setinfo", "hello", "select", "ping", "info", "config|resetstat", "script|load"}
INSIDE_THE_SCRIPT = {"get", "set", "time"}
#: Once per process or per interval, not per task: the live limits (read at
#: most every 0.5 s: one script with TIME + 4 HGETALL), publishing the
#: configured limits (HSET, once), metrics (HINCRBY..., once a second).
PERIODIC = {"hgetall", "hset", "hincrby", "hincrbyfloat", "expire"}
#: The waiting room's releaser (a thread in the worker's main process): at
#: start a persistence check and a look for each limit's rooms (ZSCAN MATCH +
#: ZSCORE), then the index of rooms once a second while nothing waits (TIME +
#: ZRANGEBYSCORE).  Whether the start falls before or after the counters are
#: reset is a race, so these are ignored, not counted.
RELEASER = {"info", "config|get", "zrange", "zrangebyscore", "zscan", "zscore"}


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_one_round_trip_per_task_when_tokens_are_there(redis_url: str, pool: str) -> None:
    if not broker_available(SYSTEM_REDIS_BROKER):
        pytest.skip("no Redis broker on 127.0.0.1:6379")
    tasks = 200
    with RedisServer() as bucket_server:
        fleet = Fleet(
            SYSTEM_REDIS_BROKER, bucket_server.url, redis_url, workers=1, pool=pool,
            limits={"api": {"rate": "100000/s", "burst": 10000}, "tenant": {"rate": "1/s"}},
        )  # fmt: skip
        try:
            fleet.start()
            bucket = redis.Redis.from_url(bucket_server.url)
            bucket.config_resetstat()
            started = time.monotonic()
            fleet.send("fleet.noop_throttled", [() for _ in range(tasks)])
            deadline = time.monotonic() + 120
            done = redis.Redis.from_url(redis_url)
            while done.llen(f"{fleet.record_key}:done") < tasks and time.monotonic() < deadline:
                time.sleep(0.1)
            assert done.llen(f"{fleet.record_key}:done") == tasks
            elapsed = time.monotonic() - started
            stats = bucket.info("commandstats")
        finally:
            fleet.stop()
            fleet.purge()
    # Commands a script runs are counted too (GET, SET, TIME inside the one
    # EVALSHA); a process's first EVALSHA fails with NOSCRIPT on a fresh
    # server (a failed call, not an answer) and is sent again after SCRIPT LOAD.
    answered = {
        name.removeprefix("cmdstat_"): int(row["calls"]) - int(row.get("failed_calls", 0))
        for name, row in stats.items()
    }
    # The live limits are one EVALSHA too (TIME + 4 HGETALL inside), read at
    # most every 0.5 s per process (2 pool processes and the releaser in the
    # main process): amortized, not per task.
    live_reads = answered.get("hgetall", 0) // 4
    assert live_reads <= 3 * (elapsed / 0.5 + 2), (live_reads, elapsed)
    # The releaser's look at the index: once a second while nothing waits.
    assert answered.get("zrangebyscore", 0) <= elapsed + 4, (answered, elapsed)
    ignored = HANDSHAKE | INSIDE_THE_SCRIPT | PERIODIC | RELEASER
    top_level = {name: n for name, n in answered.items() if name not in ignored}
    # One EVALSHA (the admission) per task, and nothing else per task.
    assert top_level == {"evalsha": tasks + live_reads}, stats
    # redis-py's Script tries EVALSHA once more before it loads the script;
    # each of the 2 pool processes (or threads, racing) may do so once per
    # script (the bucket's and the live limits').
    assert int(stats["cmdstat_evalsha"].get("failed_calls", 0)) <= 2 * 2 * 2
