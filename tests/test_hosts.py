"""Several hosts whose clocks disagree: workers in network namespaces of their
own (a veth pair each, on a private subnet made by this test), each with its
clock shifted by libfaketime, all sharing one Redis.  The fleet's peak still
respects the limit, because only the Redis clock decides.

Where namespaces are not permitted the same runs with the workers as separate
process groups on loopback (clocks still shifted); without libfaketime the
test is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.fleet import ROOT, publishing
from throttle.testing.processes import Children
from throttle.testing.redis_server import RedisServer
from throttle.testing.windows import peak_in_window

pytestmark = [pytest.mark.faults, pytest.mark.fleet, pytest.mark.slow]

SKEWS = ["-5s", "+0s", "+5s"]
LIBFAKETIME = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
]


def _libfaketime() -> str:
    for path in LIBFAKETIME:
        if Path(path).exists():
            return path
    pytest.skip("libfaketime is not installed (Debian package faketime)")


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=30)


class Hosts:
    """N network namespaces, each joined to this host by a veth pair."""

    def __init__(self, count: int) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.names = [f"thr{self.tag}{i}" for i in range(count)]
        self.host_ips = [f"10.251.{i + 1}.1" for i in range(count)]
        self.created: list[str] = []

    def create(self) -> None:
        for i, ns in enumerate(self.names):
            host_if, ns_if = f"vh{self.tag}{i}", f"vn{self.tag}{i}"
            _run("ip", "netns", "add", ns)
            self.created.append(ns)
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            _run("ip", "link", "set", ns_if, "netns", ns)
            _run("ip", "addr", "add", f"{self.host_ips[i]}/30", "dev", host_if)
            _run("ip", "link", "set", host_if, "up")
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.251.{i + 1}.2/30", "dev", ns_if)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
            _run("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def delete(self) -> None:
        for ns in self.created:
            # Deleting the namespace deletes its end of the veth, and so the pair.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        self.created.clear()


def _netns_permitted() -> bool:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = f"thrprobe{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return ok


@pytest.fixture
def hosts() -> Iterator[Hosts | None]:
    if not _netns_permitted():
        yield None
        return
    made = Hosts(len(SKEWS))
    try:
        made.create()
    except subprocess.CalledProcessError as exc:
        made.delete()
        pytest.skip(f"could not build test hosts: {exc.stderr!r}")
    yield made
    made.delete()


def test_hosts_with_shifted_clocks_hold_the_limit(hosts: Hosts | None, tmp_path: Path) -> None:
    libfaketime = _libfaketime()
    binds = ["127.0.0.1", *(hosts.host_ips if hosts else [])]
    server = RedisServer(extra_args=["--bind", *binds, "--protected-mode", "no"]).start()
    queue = f"hosts-{uuid.uuid4().hex[:8]}"
    record_key = f"hosts:{queue}"
    children = Children(tmp_path / "logs")
    try:
        for i, skew in enumerate(SKEWS):
            address = hosts.host_ips[i] if hosts else "127.0.0.1"
            url = f"redis://{address}:{server.port}/0"
            env = dict(
                os.environ,
                BROKER_URL=url, THROTTLE_REDIS_URL=url, RECORD_URL=url, RECORD_KEY=record_key,
                THROTTLE_LIMITS=json.dumps({"api": {"rate": "20/s", "burst": 5}, "tenant": "1/s"}),
                THROTTLE_PREFIX=f"throttle-{queue}", WORKER_QUEUE=queue, PYTHONPATH=str(ROOT),
                LD_PRELOAD=libfaketime, FAKETIME=skew, FAKETIME_DONT_FAKE_MONOTONIC="1",
                FAKETIME_DONT_RESET="1",
            )  # fmt: skip
            worker = [sys.executable, "-m", "celery", "-A", "tests.fleet_app", "worker", "-P", "prefork", "-c", "2",
                      "-Q", queue, "-n", f"h{i}-{queue}@%h", "--without-gossip", "--without-mingle",
                      "--without-heartbeat", "-l", "info"]  # fmt: skip
            prefix = ["ip", "netns", "exec", hosts.names[i]] if hosts else []
            children.spawn(f"host{i}", [*prefix, *worker], env, cwd=ROOT)
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 90
        while int(client.get(f"{record_key}:ready") or 0) < len(SKEWS):
            assert time.monotonic() < deadline, f"workers not ready; logs in {tmp_path / 'logs'}"
            assert not children.dead(), f"a worker died; logs in {tmp_path / 'logs'}"
            time.sleep(0.2)
        # The shifted clocks are real: each worker's time.time() disagrees
        # (measured at start: which hosts get the work is the broker's affair,
        # and one host may get none of it).
        clocks = {int(v) for v in client.hgetall(f"{record_key}:clocks").values()}
        assert clocks == {-5, 0, 5}, f"the hosts' clocks were not shifted: {clocks}"
        from celery import Celery

        producer = Celery("hosts-producer", broker=server.url)
        with publishing(producer) as publisher:
            ids = [producer.send_task("fleet.work", args=(i,), queue=queue, producer=publisher).id for i in range(150)]
        # Most runs finish in ~20 s.  A task can bounce: Celery's countdown
        # becomes an ETA on the deferring host's clock, read on the consuming
        # host's, so a slow host fires it late (the task books again) and a
        # fast one early (it hops again).  That costs time, never the limit.
        deadline = time.monotonic() + 300
        while client.llen(record_key) < 150 and time.monotonic() < deadline:
            time.sleep(0.25)
        records = [json.loads(x) for x in client.lrange(record_key, 0, -1)]
        ran = Counter(r["id"] for r in records)
        assert set(ran) == set(ids) and max(ran.values()) == 1
        skews = {round(r["local_t"] - r["t"]) for r in records}
        assert skews <= clocks, f"a body ran on a clock no host had: {skews}"
        starts = sorted(r["t"] for r in records)  # on the Redis clock
        assert peak_in_window(starts) <= 25
        print(f"hosts ({'netns' if hosts else 'process groups'}): peak {peak_in_window(starts)} "
              f"span {starts[-1] - starts[0]:.1f}s skews {sorted(skews)} "
              f"most deferrals {max(r['deferrals'] for r in records)}")  # fmt: skip
    finally:
        children.stop_all()
        server.close()
