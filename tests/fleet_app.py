"""The Celery app that fleet tests run in real worker processes.

Configured like the reference worker (``worker.config``) from the
environment; every task body records its start in the recording Redis
(``RECORD_URL``, list ``RECORD_KEY``) so the test can check what ran, when,
and how often.  Deferrals and admissions are counted through throttle's
signals.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import task_failure, worker_ready

from throttle import RateLimited
from throttle.celery import ThrottledTask
from throttle.celery.signals import backend_error, task_admitted, task_deferred
from worker.config import celery_config

app = Celery("throttle-fleet-test")
app.conf.update(celery_config())
app.conf.worker_hijack_root_logger = False
if os.environ.get("RESULT_BACKEND"):  # the events test reads task states from it
    app.conf.result_backend = os.environ["RESULT_BACKEND"]

RECORD_KEY = os.environ.get("RECORD_KEY", "fleet")
_record: redis.Redis | None = None


def recorder() -> redis.Redis:
    global _record
    if _record is None:
        _record = redis.Redis.from_url(os.environ["RECORD_URL"])
    return _record


def record(task: Any, at: tuple[int, int] | None = None, **extra: Any) -> None:
    """Record a body start at ``at`` (a TIME reply taken at the body's first line), or now."""
    req = task.request
    # The recording Redis' clock, not this host's: hosts' clocks may be
    # shifted on purpose (the clock-skew test).
    seconds, micros = at if at is not None else recorder().time()
    entry = {
        "id": req.id,
        "task": task.name,
        "t": seconds + micros / 1e6,
        "local_t": time.time(),
        "retries": req.retries,
        "pid": os.getpid(),
        "deferrals": int(getattr(req, "throttle_deferrals", None) or 0),
        "slot": float(getattr(req, "throttle_slot", None) or 0),
        **extra,
    }
    recorder().rpush(RECORD_KEY, json.dumps(entry))


@task_deferred.connect
def _count_deferral(sender: Any = None, reason: str = "", **kwargs: Any) -> None:
    recorder().hincrby(f"{RECORD_KEY}:deferred", reason, 1)


def _count_admission(sender: Any = None, paid: str = "", **kwargs: Any) -> None:
    recorder().hincrby(f"{RECORD_KEY}:admitted", paid, 1)


# Counting admissions costs a round trip per task; the gate's benchmark
# (bench/scale.py) turns it off to measure the gate alone.
if os.environ.get("RECORD_ADMISSIONS", "1") == "1":
    task_admitted.connect(_count_admission)


@backend_error.connect
def _count_backend_error(sender: Any = None, policy: str = "", **kwargs: Any) -> None:
    recorder().hincrby(f"{RECORD_KEY}:backend_error", policy, 1)


@task_failure.connect
def _count_failure(sender: Any = None, exception: BaseException | None = None, **kwargs: Any) -> None:
    recorder().hincrby(f"{RECORD_KEY}:failed", type(exception).__name__, 1)


@worker_ready.connect
def _ready(sender: Any = None, **kwargs: Any) -> None:
    # This host's clock against the recording Redis', whole seconds (the
    # clock-skew test checks its shifts here, whichever hosts get the work).
    seconds, micros = recorder().time()
    recorder().hset(f"{RECORD_KEY}:clocks", str(os.getpid()), round(time.time() - (seconds + micros / 1e6)))
    recorder().incr(f"{RECORD_KEY}:ready")


@app.task(bind=True, base=ThrottledTask, throttle="api", name="fleet.work")
def work(self: ThrottledTask, n: int) -> int:
    record(self, n=n)
    return n


@app.task(bind=True, base=ThrottledTask, throttle="api", track_started=True, ignore_result=False, name="fleet.tracked")
def tracked(self: ThrottledTask, n: int) -> int:
    """A task whose result state is kept, STARTED included (``track_started``)."""
    record(self, n=n)
    return n


@app.task(bind=True, base=ThrottledTask, throttle="api", name="fleet.other_work")
def other_work(self: ThrottledTask, n: int) -> int:
    """A second task type naming the same limit: they share one bucket."""
    record(self, n=n)
    return n


def _tenant(n: int, tenant: str) -> str:
    return tenant


@app.task(bind=True, base=ThrottledTask, throttle="tenant", throttle_key=_tenant, name="fleet.tenant_work")
def tenant_work(self: ThrottledTask, n: int, tenant: str) -> int:
    record(self, n=n, tenant=tenant)
    return n


@app.task(bind=True, base=ThrottledTask, throttle=["api", "tenant"], throttle_key=_tenant, name="fleet.both_work")
def both_work(self: ThrottledTask, n: int, tenant: str) -> int:
    """Two limits at once: the fleet's and the tenant's (give "api" per_key=False)."""
    record(self, n=n, tenant=tenant)
    return n


@app.task(bind=True, base=ThrottledTask, throttle="api", name="fleet.hit_429_once")
def hit_429_once(self: ThrottledTask, n: int, retry_after: float) -> int:
    """Raises RateLimited the first time it runs (fleet-wide), then succeeds."""
    if recorder().set(f"{RECORD_KEY}:429", 1, nx=True):
        record(self, n=n, raised=True)
        raise RateLimited(retry_after=retry_after)
    record(self, n=n)
    return n


@app.task(bind=True, base=ThrottledTask, throttle="api", max_retries=0, name="fleet.no_retries")
def no_retries(self: ThrottledTask, n: int) -> int:
    record(self, n=n)
    return n


@app.task(
    bind=True, base=ThrottledTask, throttle="api", acks_late=True, reject_on_worker_lost=True, name="fleet.slow_work"
)
def slow_work(self: ThrottledTask, n: int, seconds: float) -> int:
    """Records its start, works ``seconds``, records its end: a task to kill mid-way."""
    record(self, n=n, phase="start")
    time.sleep(seconds)
    record(self, n=n, phase="end")
    return n


def _done() -> None:
    """What the no-op tasks do: note the time they ran, nothing else."""
    recorder().rpush(f"{RECORD_KEY}:done", time.time())


@app.task(name="fleet.noop")
def noop() -> None:
    """The gate's overhead is measured against this plain task..."""
    _done()


@app.task(bind=True, base=ThrottledTask, throttle="api", name="fleet.noop_throttled")
def noop_throttled(self: ThrottledTask) -> None:
    """...and this one, the same body behind the gate."""
    _done()
