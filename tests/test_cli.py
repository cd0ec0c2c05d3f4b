"""The ``throttle`` console script, run as installed, against a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from throttle import TokenBucket
from throttle.celery.settings import parse_limits
from throttle.cli import parse_duration
from throttle.live import LiveLimits
from throttle.metrics import MetricsRecorder
from throttle.room import WaitingRoom
from throttle.testing.redis_server import free_port

SCRIPT = str(Path(sys.executable).parent / "throttle")


@pytest.fixture
def fleet_prefix(r: redis.Redis) -> Iterator[str]:
    """A prefix with two limits published as workers would publish them
    (slow ones: nothing refills while a command starts)."""
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    LiveLimits(r, prefix).publish_configured(
        parse_limits({"api": {"rate": "6/m", "burst": 5, "per_key": False}, "tenant": {"rate": "6/m", "burst": 2}})
    )
    yield prefix


def run(redis_url: str, prefix: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "THROTTLE_REDIS_URL": redis_url, "THROTTLE_PREFIX": prefix, **(env or {})}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=full_env, timeout=60, check=False)


def test_list_shows_configured_limits_and_tokens(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    TokenBucket(r, "api", rate="6/m", burst=5, prefix=fleet_prefix).consume(2)
    out = run(redis_url, fleet_prefix, "list", "--json")
    assert out.returncode == 0, out.stderr
    limits = json.loads(out.stdout)
    assert set(limits) == {"api", "tenant"}
    assert limits["api"]["rate"] == 0.1 and limits["api"]["burst"] == 5 and limits["api"]["tokens"] == 3
    assert limits["tenant"]["per_key"] and limits["tenant"]["tokens"] is None
    table = run(redis_url, fleet_prefix, "list")
    assert table.returncode == 0 and "api" in table.stdout and "per key" in table.stdout


def inspect_settled(redis_url: str, prefix: str, name: str) -> dict[str, Any]:
    """``throttle inspect NAME --json`` once the changes made so far are in force.

    A change takes effect fleet-wide CHANGE_DELAY_S after it is made; until
    then the limit in force stays, and inspect shows what is coming.
    """
    info: dict[str, Any] = json.loads(run(redis_url, prefix, "inspect", name, "--json").stdout)[name]
    if "scheduled" in info:
        time.sleep(info["scheduled"]["in"] + 0.01)
        info = json.loads(run(redis_url, prefix, "inspect", name, "--json").stdout)[name]
    return info


def test_set_unset_changes_the_live_limit(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    out = run(redis_url, fleet_prefix, "set", "api", "--rate", "20/s", "--burst", "8")
    assert out.returncode == 0, out.stderr
    assert "20/s burst 8" in out.stdout and "version 1" in out.stdout and "in force fleet-wide in 1s" in out.stdout
    pending = json.loads(run(redis_url, fleet_prefix, "inspect", "api", "--json").stdout)["api"]
    assert pending["scheduled"]["rate"] == 20 and pending["scheduled"]["version"] == 1
    assert (pending["rate"], pending["version"]) == (0.1, 0), "the configured limit until the change is in force"
    info = inspect_settled(redis_url, fleet_prefix, "api")
    assert (info["rate"], info["burst"], info["version"]) == (20, 8, 1)
    assert info["override"] == {"rate": "20/s", "burst": 8}
    assert info["bucket"] == f"{fleet_prefix}:{{api@1}}" and info["tokens"] == 8
    # Partial overrides keep the rest; mode alone too.
    assert run(redis_url, fleet_prefix, "set", "api", "--mode", "shadow").returncode == 0
    info = inspect_settled(redis_url, fleet_prefix, "api")
    assert (info["rate"], info["burst"], info["mode"]) == (20, 8, "shadow")
    assert run(redis_url, fleet_prefix, "unset", "api").returncode == 0
    info = inspect_settled(redis_url, fleet_prefix, "api")
    assert (info["rate"], info["burst"], info["mode"], info["override"]) == (0.1, 5, "enforce", None)
    again = run(redis_url, fleet_prefix, "unset", "api")
    assert again.returncode == 1 and again.stderr.count("\n") == 1


def test_inspect_a_tenant(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    TokenBucket(r, "tenant:acme", rate="6/m", burst=2, prefix=fleet_prefix).consume(2)
    info = json.loads(run(redis_url, fleet_prefix, "inspect", "tenant", "--key", "acme", "--json").stdout)["tenant"]
    assert info["tokens"] == 0 and 5 < info["next_token_in"] <= 10
    assert info["metrics"]["admitted"] == 0
    text = run(redis_url, fleet_prefix, "inspect", "tenant", "--key", "acme")
    assert text.returncode == 0 and "tenant" in text.stdout and "counters" in text.stdout


def test_pause_resume(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    out = run(redis_url, fleet_prefix, "pause", "api", "--for", "90s")
    assert out.returncode == 0, out.stderr
    state = LiveLimits(r, fleet_prefix).read()
    assert 89 < state.pause_left("api") <= 90
    listed = json.loads(run(redis_url, fleet_prefix, "list", "--json").stdout)
    assert 89 < listed["api"]["pause_left"] <= 90
    assert run(redis_url, fleet_prefix, "resume", "api").returncode == 0
    assert LiveLimits(r, fleet_prefix).read().pause_left("api") == 0
    assert run(redis_url, fleet_prefix, "resume", "api").returncode == 1


def test_reset(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    tenant = TokenBucket(r, "tenant:acme", rate="6/m", burst=2, prefix=fleet_prefix)
    tenant.consume(2)
    assert run(redis_url, fleet_prefix, "reset", "tenant", "--key", "acme").returncode == 0
    assert tenant.peek().remaining == 2
    out = run(redis_url, fleet_prefix, "reset", "api")
    assert out.returncode == 0 and "version 1" in out.stdout
    assert LiveLimits(r, fleet_prefix).version("api") == 1


def test_watch_prints_rates(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    recorder = MetricsRecorder(r, fleet_prefix)
    proc = subprocess.Popen(
        [SCRIPT, "watch", "--interval", "1", "--count", "3", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "THROTTLE_REDIS_URL": redis_url, "THROTTLE_PREFIX": fleet_prefix},
    )  # fmt: skip
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the baseline is taken (however slowly the command started)
    recorder.count(["api"], "admitted:now", 30)
    recorder.count(["api"], "deferred:empty", 10)
    recorder.flush()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in [first, *out.splitlines()]]
    assert len(lines) == 3
    assert sum(line["api"]["admitted_per_s"] for line in lines[1:]) == pytest.approx(30, rel=0.3)
    assert lines[-1]["api"]["admitted_total"] == 30 and lines[-1]["api"]["deferred_total"] == 10
    table = run(redis_url, fleet_prefix, "watch", "--interval", "0.2", "--count", "1")
    assert table.returncode == 0 and "throttle watch" in table.stdout and "api" in table.stdout


def test_metrics_endpoint(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    recorder = MetricsRecorder(r, fleet_prefix)
    recorder.count(["api"], "admitted:now", 7)
    recorder.count(["api"], "deferred:empty", 3)
    recorder.count(["tenant"], "shadow_refused", 2)
    recorder.wait(["api"], 0.3)
    recorder.flush()
    port = free_port()
    proc = subprocess.Popen(
        [SCRIPT, "metrics", "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "THROTTLE_REDIS_URL": redis_url, "THROTTLE_PREFIX": fleet_prefix},
    )  # fmt: skip
    try:
        body = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    body = response.read().decode()
                break
            except OSError:
                time.sleep(0.2)
        assert 'throttle_admitted_total{limit="api",paid="now"} 7.0' in body
        assert 'throttle_deferred_total{limit="api",reason="empty"} 3.0' in body
        assert 'throttle_shadow_refused_total{limit="tenant"} 2.0' in body
        assert 'throttle_wait_seconds_bucket{le="0.5",limit="api"} 1.0' in body
        assert 'throttle_limit_rate{limit="api"} 0.1' in body
        assert 'throttle_tokens{limit="api"} 5.0' in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err


@pytest.mark.parametrize(
    "args",
    [
        ["set", "api"],
        ["set", "api", "--rate", "fast"],
        ["set", "api", "--rate", "0/s"],
        ["set", "api", "--burst", "0"],
        ["set", "api", "--burst", "many"],
        ["set", "api", "--mode", "loud"],
        ["set", "api", "--concurrency", "0"],
        ["set", "api", "--concurrency", "2.5"],
        ["set", "api", "--concurrency", "1000001"],
        ["set", "no such", "--rate", "1/s"],
        ["set", "apx", "--rate", "1/s"],
        ["pause", "api"],
        ["pause", "api", "--for", "-5s"],
        ["pause", "api", "--for", "31d"],
        ["pause", "api", "--for", "nan"],
        ["inspect"],
        ["inspect", "api", "--key", ""],
        ["inspect", "nothing-here"],
        ["watch", "--interval", "0"],
        ["watch", "--count", "-1"],
        ["metrics", "--port", "70000"],
        ["frobnicate"],
        ["list", "--bogus"],
        ["--redis-url", "http://x", "list"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(redis_url: str, fleet_prefix: str, args: list[str]) -> None:
    out = run(redis_url, fleet_prefix, *args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stderr.startswith("throttle: error: ") and out.stderr.count("\n") == 1, out.stderr


def test_redis_down_exits_1_with_one_line(fleet_prefix: str) -> None:
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    out = run(url, fleet_prefix, "list")
    assert out.returncode == 1
    assert out.stderr.startswith("throttle: error: Redis at") and out.stderr.count("\n") == 1
    assert "s3cret" not in out.stderr


def test_parse_duration() -> None:
    assert [parse_duration(v) for v in ("60s", "5m", "1h", "500ms", "2.5")] == [60, 300, 3600, 0.5, 2.5]
    for bad in ("", "0s", "-1s", "1w", "31d", "s"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_parked_tasks_show_and_release(redis_url: str, r: redis.Redis, fleet_prefix: str) -> None:
    room = WaitingRoom(r, fleet_prefix)
    seconds, micros = r.time()
    now = seconds + micros / 1e6
    for n in range(5):
        room.park("api", f"t{n}", now + 100 + n, b"m", version=0)
    room.park("tenant:acme", "t9", now + 50, b"m", version=0)
    listed = json.loads(run(redis_url, fleet_prefix, "list", "--json").stdout)
    assert listed["api"]["parked"] == 5 and 99 < listed["api"]["next_release_in"] <= 100
    assert 103 < listed["api"]["last_release_in"] <= 104
    assert listed["tenant"]["parked"] == 1
    info = json.loads(run(redis_url, fleet_prefix, "inspect", "tenant", "--key", "acme", "--json").stdout)["tenant"]
    assert info["parked"] == 1 and info["metrics"]["parked"] == 0
    assert (
        json.loads(run(redis_url, fleet_prefix, "inspect", "tenant", "--key", "x", "--json").stdout)["tenant"]["parked"]
        == 0
    )
    table = run(redis_url, fleet_prefix, "list", env={"COLUMNS": "200"})
    assert "parked" in table.stdout and "5 (next in " in table.stdout
    out = run(redis_url, fleet_prefix, "release", "api")
    assert out.returncode == 0 and "5 parked tasks" in out.stdout, out.stderr
    after = json.loads(run(redis_url, fleet_prefix, "list", "--json").stdout)["api"]
    assert after["parked"] == 5 and after["last_release_in"] < 1, "all due now, for the workers' releasers"
    assert run(redis_url, fleet_prefix, "release", "tenant", "--key", "globex").returncode == 1


def test_version_help_and_python_m(redis_url: str, fleet_prefix: str) -> None:
    from throttle import __version__

    for args in (["--version"], ["-V"]):
        out = run(redis_url, fleet_prefix, *args)
        assert out.returncode == 0 and out.stdout.strip() == f"throttle, version {__version__}", out
    for args in (["-h"], ["--help"], ["list", "-h"], ["pause", "-h"]):
        out = run(redis_url, fleet_prefix, *args)
        assert out.returncode == 0 and out.stdout.startswith("Usage: throttle"), (args, out)
    env = {**os.environ, "THROTTLE_REDIS_URL": redis_url, "THROTTLE_PREFIX": fleet_prefix}
    command = [sys.executable, "-m", "throttle", "list", "--json"]
    module = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert module.returncode == 0 and set(json.loads(module.stdout)) == {"api", "tenant"}, module.stderr


def test_global_options_after_the_command(redis_url: str, fleet_prefix: str) -> None:
    """``throttle list --redis-url X --prefix P`` as people type it: given
    after the command, the options win over the environment and over the
    same options given before it."""
    wrong = {"THROTTLE_REDIS_URL": "redis://127.0.0.1:1/0"}
    out = run(redis_url, "nowhere", "list", "--json", "--redis-url", redis_url, "--prefix", fleet_prefix, env=wrong)
    assert out.returncode == 0 and set(json.loads(out.stdout)) == {"api", "tenant"}, out.stderr
    out = run(redis_url, fleet_prefix, "--prefix", "nowhere", "inspect", "api", "--prefix", fleet_prefix, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["api"]["burst"] == 5, out.stderr
    bad = run(redis_url, fleet_prefix, "list", "--redis-url", "http://example.com")
    assert bad.returncode == 2 and "--redis-url" in bad.stderr and "not a Redis URL" in bad.stderr


def test_celery_throttle_reads_the_apps_settings(redis_url: str, fleet_prefix: str, tmp_path: Path) -> None:
    """``celery -A proj throttle ...`` (Celery's ``celery.commands`` entry
    point) finds the buckets' Redis and the prefix in the app's config."""
    (tmp_path / "proj.py").write_text(
        "from celery import Celery\n"
        "app = Celery('proj', broker='memory://')\n"
        f"app.conf.throttle_redis_url = {redis_url!r}\n"
        f"app.conf.throttle_prefix = {fleet_prefix!r}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("THROTTLE_")}

    def celery(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "celery", "-A", "proj", "throttle", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False)

    listed = celery("list", "--json")
    assert listed.returncode == 0 and set(json.loads(listed.stdout)) == {"api", "tenant"}, listed.stderr
    assert "Usage: celery throttle" in celery("-h").stdout
    other = celery("list", "--json", "--prefix", "nothing-here")
    assert other.returncode == 0 and json.loads(other.stdout) == {}, "options after the command still win"
