"""Enqueue N tasks in a pattern: all at once, at a steady rate, or in waves.

Tasks are sent by name through a Celery app configured like the reference
worker (``worker.config``), so the producer needs no worker code, only the
broker.  Progress shows with rich; sending is bounded in count and time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from celery import Celery

from worker.config import celery_config

__all__ = ["LoadPlan", "PATTERNS", "producer_app", "send_load", "schedule"]

PATTERNS = ("burst", "steady", "waves")


@dataclass(frozen=True)
class LoadPlan:
    """What to send: ``tasks`` calls of ``task`` in ``pattern``.

    - ``burst``: everything at once;
    - ``steady``: ``rate`` tasks per second;
    - ``waves``: ``wave`` tasks at once every ``period`` seconds.
    ``tenants`` > 0 spreads calls over that many tenants (``worker.call_api_for``).
    """

    tasks: int
    pattern: str = "burst"
    rate: float = 50.0
    wave: int = 50
    period: float = 5.0
    tenants: int = 0
    task: str = "worker.call_api"

    def __post_init__(self) -> None:
        if isinstance(self.tasks, bool) or not isinstance(self.tasks, int) or self.tasks < 1:
            raise ValueError(f"tasks must be a whole number >= 1, got {self.tasks!r}")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of tasks per second, got {self.rate!r}")
        if self.wave < 1:
            raise ValueError(f"wave must be >= 1, got {self.wave!r}")
        if not (self.period > 0 and math.isfinite(self.period)):
            raise ValueError(f"period must be a positive number of seconds, got {self.period!r}")
        if self.tenants < 0:
            raise ValueError(f"tenants must be >= 0, got {self.tenants!r}")

    def call(self, i: int) -> tuple[str, tuple[object, ...]]:
        """The task name and arguments of the ``i``-th call."""
        if self.tenants:
            name = "worker.call_api_for" if self.task == "worker.call_api" else self.task
            return name, (i, f"tenant{i % self.tenants}")
        return self.task, (i,)

    @property
    def duration(self) -> float:
        """Seconds the sending takes (not the work)."""
        if self.pattern == "steady":
            return (self.tasks - 1) / self.rate
        if self.pattern == "waves":
            return (math.ceil(self.tasks / self.wave) - 1) * self.period
        return 0.0


def schedule(plan: LoadPlan) -> Iterator[float]:
    """Send offsets in seconds from the start, one per task."""
    for i in range(plan.tasks):
        if plan.pattern == "steady":
            yield i / plan.rate
        elif plan.pattern == "waves":
            yield (i // plan.wave) * plan.period
        else:
            yield 0.0


def producer_app(env: Mapping[str, str] | None = None) -> Celery:
    app = Celery("throttle-producer")
    app.conf.update(celery_config(env))
    return app


def send_load(
    app: Celery,
    plan: LoadPlan,
    on_sent: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Send the plan's tasks on schedule; the ids sent.  ``stop()`` aborts early."""
    ids: list[str] = []
    start = time.monotonic()
    queue = app.conf.task_default_queue
    with app.producer_or_acquire() as producer:
        for i, offset in enumerate(schedule(plan)):
            delay = start + offset - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if stop is not None and stop():
                break
            name, args = plan.call(i)
            ids.append(app.send_task(name, args=args, queue=queue, producer=producer).id)
            if on_sent is not None:
                on_sent(len(ids))
    return ids
