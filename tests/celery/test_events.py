"""What Celery's own tools see of a deferred task: not STARTED while it waits.

Celery ends a deferred run with ``Ignore`` and sends no event after the
``task-received`` and ``task-started`` of that run, so monitors (Flower,
``celery events``, ``celery.events.state``) would show the task started for
its whole wait.  The worker sends ``task-deferred`` per deferral (when it
sends events at all), and a task with ``track_started`` has its stored
result state set to DEFERRED.  A real worker with ``-E``, a real event
receiver, a real result backend.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import pytest
from celery import Celery
from celery.events.state import State

from tests.celery.conftest import broker
from throttle.celery.deferral import EVENT_DEFERRED, STATE_DEFERRED

pytestmark = pytest.mark.fleet


class Monitor:
    """``celery.events.state`` fed by a real receiver, with each task's states in order."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.state = State()
        self.seen: dict[str, list[tuple[str, str]]] = defaultdict(list)  # id -> [(event, state after it)]
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.state.event(event)
        uuid = event.get("uuid")
        if uuid:
            self.seen[uuid].append((event["type"], self.state.tasks[uuid].state))

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> Monitor:
        self.thread.start()
        assert self.ready.wait(10), "the event receiver did not start"
        time.sleep(0.5)  # its queue bound to the events exchange before anything is sent
        return self

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(5)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_waiting_task_is_deferred_not_started_in_events_and_results(
    fleet_factory: Any, redis_url: str, pool: str
) -> None:
    fleet = fleet_factory(
        broker("redis"), {"api": {"rate": "2/s", "burst": 1}}, workers=1, concurrency=2, pool=pool,
        extra_args=["-E"], extra_env={"RESULT_BACKEND": redis_url},
    )  # fmt: skip
    app = Celery("throttle-events-test", broker=fleet.broker_url, backend=redis_url)
    monitor = Monitor(app).start()
    try:
        ids = fleet.send("fleet.tracked", [(i,) for i in range(6)])  # 2/s, burst 1: the last waits ~2.5 s
        # A task the worker has deferred and not yet run says so in its
        # stored state (the worker takes the tasks in as its prefetch allows).
        waiting = None
        deadline = time.monotonic() + 10
        while waiting is None and time.monotonic() < deadline:
            waiting = next((r for r in map(app.AsyncResult, ids) if r.state == STATE_DEFERRED), None)
            time.sleep(0.05)
        assert waiting is not None, "the stored state of a waiting task with track_started"
        assert waiting.info["reason"] == "empty" and waiting.info["wait"] > 0
        results = [app.AsyncResult(i).get(timeout=30) for i in ids]
        assert results == list(range(6))
        time.sleep(1.0)  # the last events on their way
    finally:
        monitor.stop()
        app.close()
    deferred = [i for i in ids if any(kind == EVENT_DEFERRED for kind, _ in monitor.seen[i])]
    assert len(deferred) >= 4, f"at 2/s with a burst of 1, most of 6 tasks wait: {dict(monitor.seen)}"
    assert sum(fleet.counts("deferred").values()) == sum(
        kind == EVENT_DEFERRED for i in ids for kind, _ in monitor.seen[i]
    ), f"one task-deferred event per deferral: {dict(monitor.seen)}"
    for task_id in deferred:
        states = monitor.seen[task_id]
        first = next(n for n, (kind, _) in enumerate(states) if kind == EVENT_DEFERRED)
        after = [state for _, state in states[first:]]
        assert "STARTED" not in after, f"{task_id}: STARTED after its first deferral: {states}"
        assert after[-1] == "SUCCESS", f"{task_id}: {states}"
        event = monitor.state.tasks[task_id]
        assert event.started is not None, "the run's start is still recorded (a timestamp)"
