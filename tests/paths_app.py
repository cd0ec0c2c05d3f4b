"""The fleet app plus tasks for the paths off the happy one (a worker runs ``-A tests.paths_app``).

Their limits, ``paths`` and ``paths_tenant``, are configured only by the
tests that start these workers (tests/celery/test_paths.py, test_model.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.fleet_app import RECORD_KEY, app, record, recorder
from throttle import RateLimited
from throttle.celery import ThrottledTask
from throttle.celery.signals import limit_paused, task_admitted

__all__ = ["app"]


# -- Paths off the happy one (tests/celery/test_paths.py, tests/celery/test_model.py) --
#
# One body, many behaviours: ``actions`` lists what each run of the task does,
# in order (a run is one start of the body: retries and re-runs after a 429
# count).  The run's index comes from a counter per task id in the recording
# Redis, so a retry or a re-run picks the next action.
#   "ok"            return
#   "sleep:S"       work S seconds, then return (keeps a pool slot busy)
#   "retry:C"       self.retry(countdown=C)
#   "429:X"         raise RateLimited(retry_after=X)
#   "boom"          raise ValueError (autoretry tasks retry it; others fail)


def _behave(task: Any, n: int, actions: list[str], tenant: str = "") -> int:
    # The start's time and the run's index in one round trip, as the body's
    # first line: a second round trip before TIME would add its latency (tens
    # of ms on a loaded host) to every recorded start.
    pipe = recorder().pipeline(transaction=False)
    pipe.time()
    pipe.incr(f"{RECORD_KEY}:runs:{task.request.id}")
    admission = _admissions.pop(task.request.id, None)
    if admission is not None:
        pipe.rpush(f"{RECORD_KEY}:admissions", admission)
    started, runs, *_ = pipe.execute()
    action = actions[min(runs, len(actions)) - 1] if actions else "ok"
    record(task, at=started, n=n, tenant=tenant, run=runs, action=action)
    kind, _, arg = action.partition(":")
    if kind == "sleep":
        time.sleep(float(arg))
    elif kind == "retry":
        raise task.retry(countdown=float(arg), max_retries=50)
    elif kind == "429":
        raise RateLimited(retry_after=float(arg))
    elif kind == "boom":
        raise ValueError(f"boom {n}")
    recorder().rpush(f"{RECORD_KEY}:finished", task.request.id)
    return n


def _paths_tenant(n: int, actions: list[str], tenant: str = "") -> str:
    return tenant or "none"


@app.task(bind=True, base=ThrottledTask, throttle="paths", name="fleet.paths")
def paths(self: ThrottledTask, n: int, actions: list[str], tenant: str = "") -> int:
    return _behave(self, n, actions, tenant)


@app.task(
    bind=True, base=ThrottledTask, throttle="paths", name="fleet.paths_auto",
    autoretry_for=(Exception,), retry_kwargs={"countdown": 0.1}, max_retries=50,
)  # fmt: skip
def paths_auto(self: ThrottledTask, n: int, actions: list[str], tenant: str = "") -> int:
    """Celery's autoretry_for=(Exception,), as much real code has it: RateLimited must still pause the fleet."""
    return _behave(self, n, actions, tenant)


@app.task(bind=True, base=ThrottledTask, throttle="paths_tenant", throttle_key=_paths_tenant, name="fleet.paths_tenant")
def paths_tenant(self: ThrottledTask, n: int, actions: list[str], tenant: str = "") -> int:
    return _behave(self, n, actions, tenant)


#: Admissions not yet recorded: the body's first round trip records them, so
#: that recording costs no round trip between the gate and the body.
_admissions: dict[str, str] = {}


@task_admitted.connect
def _log_admission(sender: Any = None, task_id: str = "", paid: str = "", deferrals: int = 0, **kwargs: Any) -> None:
    """What the gate knew of each admitted run: how it paid, how often it had been deferred."""
    _admissions[task_id] = json.dumps({"id": task_id, "paid": paid, "deferrals": deferrals})


@limit_paused.connect
def _log_pause(sender: Any = None, seconds: float = 0.0, **kwargs: Any) -> None:
    seconds_now, micros = recorder().time()
    recorder().rpush(f"{RECORD_KEY}:pauses", json.dumps({"t": seconds_now + micros / 1e6, "seconds": seconds}))
