"""Every public entry point against the same table of bad values.

Each bad value must raise TypeError or ValueError whose message names the
parameter: never a crash deeper down, a silent pass-through or an unbounded
wait.  (Keys with odd characters and corrupted values in Redis are valid
input with a safe outcome: see test_bucket.py.)
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import Celery

from tests.fleet import ROOT
from throttle import Limit, RateLimited, RedisTokenBucket, TokenBucket, parse_rate
from throttle.celery import ThrottledTask
from throttle.celery.settings import ThrottleSettings

BAD = {
    "zero": 0,
    "negative": -1,
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "huge": 1e300,
    "unparseable": "abc",
    "empty": "",
    "none": None,
    "bool": True,
    "list": [1],
    "bytes": b"10/s",
    "bad unit": "10/d",
    "fraction": 2.5,
}

# Entry point -> (the call, the words its error must contain, bad values that
# are in fact valid there).
Entry = tuple[Callable[[Any], object], str, set[str]]


def entries(client: redis.Redis) -> dict[str, Entry]:
    bucket = TokenBucket(client, "bad-input", rate="1/m", burst=3)
    app = Celery("bad", broker="memory://", set_as_current=False)

    def setting(name: str) -> Callable[[Any], object]:
        return lambda v: ThrottleSettings.from_conf({"throttle_redis_url": "redis://x", name: v})

    def task_option(name: str) -> Callable[[Any], object]:
        def make(v: Any) -> object:
            local = Celery("bad", broker="memory://", set_as_current=False)
            local.conf.throttle_redis_url = "redis://127.0.0.1:1/0"
            local.conf.throttle_limits = {"api": {"rate": "10/s", "burst": 3}}
            options = {"throttle": "api", name: v} if name != "throttle" else {"throttle": v}

            def job() -> None:
                return None

            local.task(base=ThrottledTask, shared=False, name="t", **options)(job)
            local.finalize()
            return local.tasks["t"]

        return make

    del app
    return {
        "parse_rate": (parse_rate, "rate", {"fraction"}),
        "Limit(rate)": (lambda v: Limit(v, 1), "rate", {"fraction"}),
        "Limit(burst)": (lambda v: Limit(10, v), "burst", set()),
        "TokenBucket(rate)": (lambda v: TokenBucket(client, "k", rate=v, burst=1), "rate", {"fraction"}),
        "TokenBucket(burst)": (lambda v: TokenBucket(client, "k", rate=1, burst=v), "burst", set()),
        "TokenBucket(key)": (
            lambda v: TokenBucket(client, v, rate=1, burst=1), "key", {"unparseable", "bytes", "bad unit"}),
        "RedisTokenBucket(burst_rate)": (
            lambda v: RedisTokenBucket(client, key="k", burst_rate=v, replenishment_rate=1), "burst", set()),
        "RedisTokenBucket(replenishment_rate)": (
            lambda v: RedisTokenBucket(client, key="k", burst_rate=1, replenishment_rate=v), "rate", {"fraction"}),
        "consume(cost)": (bucket.consume, "cost", set()),
        "peek(cost)": (bucket.peek, "cost", set()),
        "reserve(max_wait)": (lambda v: bucket.reserve(max_wait=v), "max_wait", {"zero", "fraction"}),
        "pause(seconds)": (bucket.pause, "seconds", {"zero", "fraction"}),
        "RateLimited(retry_after)": (RateLimited, "retry_after", {"zero", "fraction", "huge"}),
        "throttle_limits": (
            lambda v: setting("throttle_limits")({"api": {"rate": v}}), "throttle_limits", {"fraction"}),
        "throttle_max_defer": (setting("throttle_max_defer"), "throttle_max_defer", {"fraction"}),
        "throttle_max_countdown": (setting("throttle_max_countdown"), "throttle_max_countdown", {"fraction"}),
        "throttle_on_backend_error": (setting("throttle_on_backend_error"), "throttle_on_backend_error", set()),
        "task throttle=": (task_option("throttle"), "throttle", {"fraction"}),
        "task throttle_cost=": (task_option("throttle_cost"), "throttle_cost", set()),
    }  # fmt: skip


@pytest.mark.parametrize("bad", list(BAD))
def test_every_entry_point_names_what_is_wrong(r: redis.Redis, bad: str) -> None:
    value = BAD[bad]
    failures = []
    for name, (call, words, valid) in entries(r).items():
        if bad in valid:
            continue
        try:
            call(value)
        except (TypeError, ValueError) as exc:
            if words not in str(exc):
                failures.append(f"{name}({value!r}): message {str(exc)!r} does not name {words!r}")
        except Exception as exc:
            failures.append(f"{name}({value!r}): {type(exc).__name__} instead of TypeError/ValueError: {exc}")
        else:
            failures.append(f"{name}({value!r}) was accepted")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "args",
    [["--tasks", "0"], ["--tasks", "-5"], ["--pattern", "zigzag"], ["--rate", "0"], ["--rate", "nan"],
     ["--tenants", "-1"], ["--period", "inf"]],
)  # fmt: skip
def test_producer_cli_refuses_bad_flags(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "producer", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "Error" in result.stderr and args[0].lstrip("-") in result.stderr


@pytest.mark.parametrize("args", [["--rate", "fast"], ["--burst", "0"], ["--mode", "sliding"], ["--port", "x"]])
def test_mock_api_refuses_bad_flags(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.mock_api", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "error" in result.stderr
