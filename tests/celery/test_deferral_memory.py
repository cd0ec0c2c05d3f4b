"""A deferral leaves no garbage for the cyclic collector.

Celery's tracer keeps the ``Ignore`` that ends a deferred run in a local of
its own frame, and the exception's traceback points back at that frame: a
cycle holding the request and two picklable tracebacks (~0.4 MB), freed only
by the collector's rare full collections.  A pool child parking tasks grew
from 50 to 195 MB that way.  throttle cuts the cycle after the tracer is done
(``task_postrun``).  Celery's own tracer, the real gate, a real Redis.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.app.trace import build_tracer

from throttle.celery import ThrottledTask


@pytest.fixture
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_deferrals_leave_no_cycles(redis_url: str, prefix: str, gc_off: None) -> None:
    app = Celery("memory", broker="memory://", set_as_current=False)
    app.conf.update(
        throttle_redis_url=redis_url,
        throttle_prefix=prefix,
        throttle_limits={"slow": {"rate": "1/h", "burst": 1}},  # after the first, every task parks
        task_ignore_result=True,
    )

    @app.task(bind=True, base=ThrottledTask, throttle="slow", name="memory.slow", shared=False)
    def slow(self: ThrottledTask, n: int) -> int:
        return n

    app.finalize()
    tracer = build_tracer("memory.slow", app.tasks["memory.slow"], app=app, eager=False)
    deferrals = 200
    for i in range(deferrals + 1):
        task_id = f"task-{i}"
        request = {"id": task_id, "delivery_info": {"routing_key": "celery"}, "headers": {}, "task": "memory.slow"}
        tracer(task_id, [i], {}, request)
    left = gc.collect()
    # Before the fix: ~24 objects in cycles per deferral (4,800 here).
    assert left < deferrals, f"{left} objects in reference cycles after {deferrals} deferrals"
