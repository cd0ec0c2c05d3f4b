"""Real Celery worker processes for fleet tests, started and stopped by pid.

Each worker runs in its own session (process group), so stopping it stops
its pool children too, and nothing else on the machine is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from throttle.keys import stats_key
from throttle.testing.processes import spawn, stop_groups
from worker.config import worker_env

ROOT = Path(__file__).resolve().parent.parent

SYSTEM_REDIS_BROKER = "redis://127.0.0.1:6379/0"
SYSTEM_RABBITMQ_BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def broker_available(url: str) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 0), timeout=1):
            return True
    except OSError:
        return False


@contextmanager
def publishing(app: Any) -> Iterator[Any]:
    """A producer on a broker connection of its own, closed on exit.

    ``app.producer_or_acquire()`` takes its connection from kombu's pools,
    which are global to the process and keyed by broker URL: the socket
    outlives the app (``app.close()`` does not reach it) and is reported as
    an unclosed socket (``ResourceWarning``) when it is finally collected.
    """
    with app.connection_for_write() as conn:
        yield app.amqp.Producer(conn)


@dataclass
class Fleet:
    """K worker processes of ``tests.fleet_app`` on a queue of their own."""

    broker_url: str
    throttle_redis_url: str
    record_url: str
    limits: Mapping[str, Any] = field(default_factory=dict)
    workers: int = 4
    concurrency: int = 2
    pool: str = "prefork"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: More ``celery worker`` options (``-E``: send task events).
    extra_args: Sequence[str] = ()
    queue: str = field(default_factory=lambda: f"fleet-{uuid.uuid4().hex[:8]}")
    record_key: str = field(default_factory=lambda: f"fleet:{uuid.uuid4().hex[:8]}")
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: Producer apps handed out, closed at stop: an app's pooled broker
    #: connection left to the GC is an unclosed socket (a ResourceWarning).
    apps: list[Any] = field(default_factory=list)
    #: The Celery app the workers run: the test app, or the reference worker.
    app_module: str = "tests.fleet_app"
    log_dir: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        return worker_env(
            self.broker_url, self.throttle_redis_url, self.limits, f"throttle-{self.queue}", self.queue,
            RECORD_URL=self.record_url,
            RECORD_KEY=self.record_key,
            PYTHONPATH=str(ROOT),
            **self.extra_env,
        )  # fmt: skip

    def producer(self) -> Any:
        """A plain Celery app on the fleet's broker, to send tasks by name."""
        from celery import Celery

        app = Celery("throttle-fleet-producer", broker=self.broker_url)
        app.conf.task_default_queue = self.queue
        app.conf.broker_connection_retry_on_startup = True
        self.apps.append(app)
        return app

    def send(self, name: str, calls: list[tuple[Any, ...]]) -> list[str]:
        """Send one task ``name(*args)`` per entry of ``calls``; their ids."""
        app = self.producer()
        with publishing(app) as producer:
            return [app.send_task(name, args=args, queue=self.queue, producer=producer).id for args in calls]

    def start(self, timeout: float = 60.0) -> Fleet:
        self.log_dir = Path(os.environ.get("FLEET_LOG_DIR", "/tmp")) / f"throttle-{self.queue}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.workers):
            self.start_worker(i)
        self.wait_ready(self.workers, timeout)
        return self

    def start_worker(self, index: int) -> subprocess.Popen[bytes]:
        log_dir = self.log_dir or Path("/tmp") / f"throttle-{self.queue}"
        args = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-Q", self.queue,
            "-n", f"w{index}-{self.queue}@%h", "-l", "info",
            "--without-gossip", "--without-mingle", "--without-heartbeat", *self.extra_args,
        ]  # fmt: skip
        proc = spawn(args, self.env, log_dir / f"worker{index}.log", cwd=ROOT)
        self.processes.insert(index, proc)
        return proc

    def revive(self) -> int:
        """Start again every worker that has exited, as a supervisor would
        (compose's ``restart: unless-stopped``, systemd's ``Restart=always``);
        how many were started."""
        revived = 0
        for index, proc in enumerate(list(self.processes)):
            if proc.poll() is not None:
                self.processes.remove(proc)
                self.start_worker(index)
                revived += 1
        return revived

    def ready_count(self) -> int:
        if self.app_module == "worker.app":  # the reference worker counts itself in its stats
            stats = redis.Redis.from_url(self.throttle_redis_url)
            return int(stats.hget(stats_key(f"throttle-{self.queue}"), "workers_ready") or 0)
        return int(redis.Redis.from_url(self.record_url).get(f"{self.record_key}:ready") or 0)

    def wait_ready(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_count() >= count:
                return
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                raise RuntimeError(f"worker exited with {dead[0].returncode}: see {self.log_dir}")
            time.sleep(0.1)
        raise RuntimeError(f"{count} workers not ready within {timeout}s: see {self.log_dir}")

    def stop(self, timeout: float = 20.0) -> None:
        """Warm shutdown (SIGTERM) of each worker's process group, then SIGKILL."""
        stop_groups(self.processes, timeout)
        self.processes.clear()
        while self.apps:
            self.apps.pop().close()

    def records(self) -> list[dict[str, Any]]:
        with redis.Redis.from_url(self.record_url) as rec:
            return [json.loads(x) for x in rec.lrange(self.record_key, 0, -1)]

    def counts(self, what: str) -> dict[str, int]:
        with redis.Redis.from_url(self.record_url) as rec:
            raw: dict[bytes, bytes] = rec.hgetall(f"{self.record_key}:{what}")
        return {k.decode(): int(v) for k, v in raw.items()}

    def wait_for_records(self, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        rec = redis.Redis.from_url(self.record_url)
        while time.monotonic() < deadline:
            if rec.llen(self.record_key) >= count:
                break
            time.sleep(0.1)
        return self.records()

    def purge(self) -> None:
        """Drop what is left in this fleet's queue (the queue is ours alone)."""
        from celery import Celery

        app = Celery(broker=self.broker_url)
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_purge(self.queue)
        except Exception:
            pass
        finally:
            app.close()
