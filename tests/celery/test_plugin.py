"""throttle's pytest plugin beside Celery's in-process fixtures, as a user's
test suite would use them: ``celery_config`` built on
``throttle_celery_config``, ``celery_app``, an in-process worker
(``start_worker``, threads pool), ``throttle_decisions`` to assert on."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from throttle import RateLimited
from throttle.celery import ThrottledTask
from throttle.testing.decisions import Decisions

pytestmark = pytest.mark.slow


@pytest.fixture
def celery_config(throttle_celery_config: dict[str, Any]) -> dict[str, Any]:
    return {
        **throttle_celery_config,
        "broker_url": "memory://",
        "result_backend": "cache+memory://",
        "throttle_limits": {"github": {"rate": "5/s", "burst": 1}},
    }


def test_decisions_are_recorded_and_asserted(celery_app: Celery, throttle_decisions: Decisions) -> None:
    @celery_app.task(base=ThrottledTask, throttle="github", name="plugin.fetch", shared=False)
    def fetch(n: int) -> int:
        return n

    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False):
        results = [fetch.delay(n) for n in range(4)]
        assert [r.get(timeout=20) for r in results] == [0, 1, 2, 3]
        last = throttle_decisions.assert_admitted(results[-1].id)
    assert last.task_name == "plugin.fetch" and last.limits == ("github",)
    assert len(throttle_decisions.admitted(task="plugin.fetch")) == 4
    assert len(throttle_decisions.deferred(reason="empty")) == 3, "burst 1: three of four booked a slot"
    starts = sorted(d.at for d in throttle_decisions.admitted())
    assert starts[-1] - starts[0] >= 3 / 5 - 0.1, "4 starts at 5/s with a burst of 1 span 0.6 s"
    with pytest.raises(AssertionError, match="not seen within"):
        throttle_decisions.assert_deferred("no-such-task", timeout=0.2)


def test_a_429_pauses_and_defers(celery_app: Celery, throttle_decisions: Decisions) -> None:
    calls: list[int] = []

    @celery_app.task(base=ThrottledTask, throttle="github", name="plugin.limited", shared=False)
    def limited() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise RateLimited(retry_after=0.5)
        return len(calls)

    with start_worker(celery_app, pool="threads", concurrency=1, perform_ping_check=False):
        result = limited.delay()
        assert result.get(timeout=20) == 2
    deferred = throttle_decisions.assert_deferred(result.id, reason="rate_limited")
    assert deferred.wait is not None and deferred.wait >= 0.5 - 0.05
    assert [d.seconds for d in throttle_decisions.of("paused")] == [0.5]


@pytest.mark.celery(throttle_enabled=False)
def test_the_gate_can_be_switched_off(celery_app: Celery, throttle_decisions: Decisions) -> None:
    @celery_app.task(base=ThrottledTask, throttle="github", name="plugin.free", shared=False)
    def free(n: int) -> int:
        return n

    with start_worker(celery_app, pool="threads", concurrency=2, perform_ping_check=False):
        assert [r.get(timeout=20) for r in [free.delay(n) for n in range(6)]] == list(range(6))
    assert throttle_decisions.all == [], "throttle_enabled=False: no decision at all"
