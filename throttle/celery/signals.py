"""Celery signals the gate sends, for monitors and metrics to count.

Connect like any Celery signal::

    from throttle.celery.signals import task_deferred

    @task_deferred.connect
    def count(sender, task_id, wait, reason, **kwargs): ...

Every signal is sent in the worker process that made the decision, with the
task (``sender``), ``task_id`` and ``limits`` (the bucket names decided).
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["task_admitted", "task_deferred", "limit_paused", "backend_error", "shadow_refused"]

#: The body is about to run.  ``paid``: "now" (tokens taken at this delivery)
#: or "booked" (the task comes back at a slot it booked earlier).
task_admitted = Signal(name="throttle_task_admitted")

#: The task was re-sent with a countdown instead of running.  ``wait``: the
#: seconds until it runs (or looks again); ``reason`` (``DeferralReason``):
#: "empty" (slot booked), "early" (came back before its slot), "late" (came
#: back too long after it: booked again), "changed" (booked under a limit
#: changed since: booked again), "paused", "rate_limited" (the body raised
#: RateLimited), "backend" (Redis down).
task_deferred = Signal(name="throttle_task_deferred")

#: A body raised RateLimited: the limits were paused for ``seconds``.
limit_paused = Signal(name="throttle_limit_paused")

#: Redis could not answer; ``policy`` says what was done ("defer", "allow", "fail").
backend_error = Signal(name="throttle_backend_error")

#: A shadow-mode limit would have deferred the task (``wait`` seconds); it runs.
shadow_refused = Signal(name="throttle_shadow_refused")
