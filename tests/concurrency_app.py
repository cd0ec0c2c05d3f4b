"""The Celery app of the concurrency fleet tests (``tests/celery/test_concurrency.py``).

Its own app: every task of an app needs its limit configured, and the other
fleet tests configure only theirs (this app's are
``tests.celery.conftest.CONCURRENCY_LIMITS``).  Records like
``tests.fleet_app`` (the same recording Redis, the same signals counted),
plus each body's end.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Reject

from tests.fleet_app import RECORD_KEY, _done, record, recorder
from throttle import RateLimited
from throttle.celery import ThrottledTask
from worker.config import celery_config

app = Celery("throttle-concurrency-test")
app.conf.update(celery_config())
app.conf.worker_hijack_root_logger = False


def _held(task: Any, n: int, seconds: float) -> int:
    """A body that holds a concurrency lease for ``seconds``: its start and end recorded (Redis time)."""
    record(task, n=n, phase="start")
    time.sleep(seconds)
    record(task, n=n, phase="end")
    return n


@app.task(bind=True, base=ThrottledTask, throttle="slots", name="fleet.held")
def held(self: ThrottledTask, n: int, seconds: float) -> int:
    """At most ``slots``' concurrency of these bodies run at once, fleet-wide."""
    return _held(self, n, seconds)


@app.task(bind=True, base=ThrottledTask, throttle="slots_rated", name="fleet.held_rated")
def held_rated(self: ThrottledTask, n: int, seconds: float) -> int:
    """A rate and a concurrency on one limit."""
    return _held(self, n, seconds)


@app.task(bind=True, base=ThrottledTask, throttle="slots", acks_late=True, reject_on_worker_lost=True,
          name="fleet.held_late")  # fmt: skip
def held_late(self: ThrottledTask, n: int, seconds: float) -> int:
    """Acknowledged after the body: a killed worker's run is delivered again."""
    return _held(self, n, seconds)


@app.task(bind=True, base=ThrottledTask, throttle="slots", time_limit=1, name="fleet.held_limited")
def held_limited(self: ThrottledTask, n: int, seconds: float) -> int:
    """Killed by its hard time limit after 1 s."""
    return _held(self, n, seconds)


@app.task(bind=True, base=ThrottledTask, throttle="slots", soft_time_limit=0.5, autoretry_for=(ValueError,),
          max_retries=1, default_retry_delay=0, name="fleet.held_path")  # fmt: skip
def held_path(self: ThrottledTask, n: int, how: str) -> int:
    """A body of concurrency limit ``slots`` that ends the way ``how`` says, on its first attempt.

    Every way must give the lease back at once: with ``lease_expiry`` 60 s a
    leaked lease would stall the next task for a minute.
    """
    return _end_by(self, n, how, 0.05)


@app.task(bind=True, base=ThrottledTask, throttle="slots", acks_late=True, reject_on_worker_lost=True,
          autoretry_for=(ValueError,), max_retries=1, default_retry_delay=0, name="fleet.held_model")  # fmt: skip
def held_model(self: ThrottledTask, n: int, how: str, seconds: float) -> int:
    """``held_path`` for the model test: any length, acknowledged late (a killed run comes back)."""
    return _end_by(self, n, how, seconds)


def _end_by(task: Any, n: int, how: str, seconds: float) -> int:
    attempt = int(recorder().incr(f"{RECORD_KEY}:attempt:{task.request.id}"))
    record(task, n=n, phase="start", how=how, attempt=attempt)
    self = task
    try:
        if attempt > 1 or how == "ok":
            time.sleep(seconds)
            return n
        if how == "raise":
            raise KeyError("the body failed")
        if how == "retry":
            raise self.retry(countdown=0)
        if how == "autoretry":
            raise ValueError("autoretry_for turns this into a retry")
        if how == "ratelimited":
            raise RateLimited(retry_after=0.1)
        if how == "ignore":
            raise Ignore()
        if how == "reject":
            raise Reject("rejected by the body", requeue=False)
        if how == "soft":
            time.sleep(2)  # SoftTimeLimitExceeded at 0.5 s (prefork)
        raise AssertionError(how)
    finally:
        record(task, n=n, phase="end", how=how, attempt=attempt)


@app.task(bind=True, base=ThrottledTask, throttle="slots", time_limit=1, name="fleet.held_stuck")
def held_stuck(self: ThrottledTask, n: int, seconds: float) -> int:
    """Killed by its hard time limit while deaf to SIGTERM (a body stuck in C code):
    the pool's SIGKILL ends it, nothing in the process runs after."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return _held(self, n, seconds)


@app.task(bind=True, base=ThrottledTask, throttle="slots", name="fleet.noop_slots")
def noop_slots(self: ThrottledTask) -> None:
    """A no-op body behind a concurrency limit only (the gate's cost)."""
    _done()


@app.task(bind=True, base=ThrottledTask, throttle="slots_rated", name="fleet.noop_slots_rated")
def noop_slots_rated(self: ThrottledTask) -> None:
    """A no-op body behind a rate and a concurrency limit (the gate's cost)."""
    _done()


@app.task(bind=True, base=ThrottledTask, throttle="rate_only", name="fleet.held_rate_only")
def held_rate_only(self: ThrottledTask, n: int, seconds: float) -> int:
    """The same body behind a rate alone (``bench.concurrency`` compares the two)."""
    return _held(self, n, seconds)


def _tenant_of(n: int, tenant: str, seconds: float) -> str:
    return tenant


@app.task(bind=True, base=ThrottledTask, throttle="tenant_slots", throttle_key=_tenant_of, name="fleet.held_tenant")
def held_tenant(self: ThrottledTask, n: int, tenant: str, seconds: float) -> int:
    """A concurrency limit per tenant (``per_key``, the default)."""
    record(self, n=n, phase="start", tenant=tenant)
    time.sleep(seconds)
    record(self, n=n, phase="end", tenant=tenant)
    return n


@app.task(bind=True, base=ThrottledTask, throttle=["slots", "slots_b"], name="fleet.held_two")
def held_two(self: ThrottledTask, n: int, seconds: float) -> int:
    """Two concurrency limits, all or nothing: a lease of each, or neither."""
    return _held(self, n, seconds)
