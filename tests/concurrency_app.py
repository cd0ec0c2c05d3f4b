"""The Celery app of the concurrency fleet tests (``tests/celery/test_concurrency.py``).

Its own app: every task of an app needs its limit configured, and the other
fleet tests configure only theirs.  Records like ``tests.fleet_app`` (the
same recording Redis, the same signals counted), plus each body's end.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from tests.fleet_app import record
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
