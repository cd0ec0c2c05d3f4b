"""The gate: one decision for one delivery of one throttled task.

It runs in ``ThrottledTask.before_start``, in the pool process, after the
task was received and before its body.  With a token in the bucket it costs
one Redis round trip and the body runs.  With the bucket empty it books the
task's slot, leaves a ticket for it in Redis, sends the same task again with
that countdown (same id, same ``request.retries``, throttle's headers below)
and ends this run with ``Ignore``: the retry budget is untouched and no pool
slot sleeps.  When the task comes back it redeems its ticket (one round
trip, on Redis' clock) and runs without paying again.

The promise: the body starts of a limit's tasks, in any window of ``w``
seconds, number at most ``burst + rate * (w + EPSILON_S)``.  A booked task
starts within ``GRACE_S`` of its slot or books again (the missed slot is
forfeit); only a ticket makes a slot, so headers copied into a retry, forged
by a producer or delivered twice buy nothing.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any, Literal

from celery.exceptions import Ignore

from ..bucket import MultiBucket, TokenBucket
from ..errors import BackendUnavailable, RateLimited, ThrottleDeferralExpired
from ..keys import limit_of
from ..limit import MAX_WAIT_SECONDS, Limit
from ..tickets import Verdict
from . import signals
from .deferral import DeferralReason, Stamp, resend
from .options import TaskPlan
from .runtime import Effective, runtime_for

if TYPE_CHECKING:
    from celery import Task

__all__ = ["Gate", "Paid", "GRACE_S", "EPSILON_S"]

logger = logging.getLogger("throttle")

#: How late after its booked slot (Redis time) a task may still start.  Later
#: than that it books again and the slot is forfeit: running late would
#: bunch up with the tasks booked after it.
GRACE_S = 0.025

#: The scheduling tolerance of the promise: GRACE_S, plus the time from the
#: gate's decision to the first line of the body on a busy host.
EPSILON_S = 0.05

#: How an admitted task paid: tokens taken at this delivery, or a slot booked earlier.
Paid = Literal["now", "booked"]

#: While an operator's pause lasts, waiting tasks look again this often, so
#: that a ``throttle resume`` lets them run within seconds.
_PAUSE_HOP_S = 2.0

#: A slot this close is waited for in place: cheaper than a broker round trip.
_SPIN_S = 0.025

#: A deferred task is sent to arrive this much before its slot (broker and
#: timer latency), then waits the rest in place (less than _SPIN_S).
_LEAD_S = 0.015

#: While Redis is down, "defer" re-sends with these countdowns (doubling).
_BACKEND_BACKOFF_S = (1.0, 30.0)


def _wait_briefly(seconds: float) -> None:
    """Wait out a slot at most ``_SPIN_S`` away, in place.

    Some hosts refuse a short sleep (seen under libfaketime: EINVAL); there
    the wait is spun out on the monotonic clock instead (at most _SPIN_S of
    CPU), so the task still starts at its slot, neither early nor late.
    """
    if seconds <= 0:
        return
    deadline = time.monotonic() + seconds
    try:
        time.sleep(seconds)
    except OSError:
        while time.monotonic() < deadline:
            pass


class Gate:
    """One decision for one delivery of one task."""

    buckets: TokenBucket | MultiBucket  # the enforced limits' buckets, set by _load()

    def __init__(self, task: Task, plan: TaskPlan, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.plan = plan
        self.args = args
        self.kwargs = kwargs
        self.runtime = runtime_for(task.app)
        self.settings = self.runtime.settings
        self.tenant = plan.tenant(args, kwargs)
        self.cost = plan.cost_for(args, kwargs)
        # Until the live state is read: the configured limits.
        self.names = plan.bucket_names(args, kwargs)
        self.limit_names = tuple(nl.name for nl in plan.limits)
        self.effective: Effective | None = None
        self.shadow: TokenBucket | MultiBucket | None = None
        self.stamp = Stamp.read(task.request)
        self.deferrals, self.since = self.stamp.deferrals, self.stamp.since
        self.runtime.publish()

    def _load(self) -> Effective:
        """Apply the live state: effective limits, their buckets, the pause."""
        effective = self.runtime.effective(self.plan, self.tenant, self.runtime.state())
        self.effective = effective
        if effective.enforce:
            self.names = [name for name, _ in effective.enforce]
            self.buckets = self.runtime.buckets(effective.enforce)
            burst = min(limit.burst for _, limit in effective.enforce)
            if self.cost > burst:
                # A live override made the burst smaller than this task's
                # cost: it could never run.  Take the whole burst instead.
                logger.warning(
                    "%s[%s] costs %d tokens but %s now holds %d: taking %d",
                    self.task.name, self.task.request.id, self.cost, self._label(), burst, burst,
                )  # fmt: skip
                self.cost = burst
        if effective.shadow:
            self.shadow = self.runtime.buckets(effective.shadow)
        return effective

    def _label(self, names: list[str] | None = None) -> str:
        """Bucket names for a log line: tenants are user input, so quoted (no forged lines)."""
        return ",".join(repr(name) for name in (self.names if names is None else names))

    def _count(self, field: str, n: int = 1) -> None:
        if self.runtime.metrics is not None:
            self.runtime.metrics.count(self.limit_names, field, n)

    # The two entry points -------------------------------------------------

    def admit(self) -> None:
        """Return to run the body; raise ``Ignore`` after re-sending the task."""
        try:
            effective = self._load()
            if effective.pause_left > 0:
                # An operator paused a limit: wait, looking again every few
                # seconds; a booked slot will be past by then (forfeit).
                self._defer(min(effective.pause_left, _PAUSE_HOP_S), DeferralReason.PAUSED)
            if not effective.enforce:
                self._admitted("now")  # shadow limits only: count, never defer
            elif self.stamp.booked and self.stamp.versions not in (None, effective.versions):
                # Booked under a limit that has changed since: book again
                # in the new bucket.
                self._book(DeferralReason.CHANGED)
            elif self.stamp.booked:
                self._arrive()
            else:
                self._book(DeferralReason.EMPTY)
        except BackendUnavailable as exc:
            self._backend_error(exc)

    def rate_limited(self, exc: RateLimited) -> None:
        """The body hit the remote API's limit: pause the fleet, defer this task.

        Always deferred, even for ``Retry-After: 0``: this delivery's body
        already ran, so running it again needs a token of its own.  Returns
        (without deferring) only when no limit of the task is enforced.
        """
        seconds = min(exc.retry_after, float(MAX_WAIT_SECONDS))
        logger.warning(
            "%s[%s] remote API rate limited: pausing %s for %.3fs%s",
            self.task.name, self.task.request.id, self._label(), seconds,
            "" if seconds == exc.retry_after else f" (asked {exc.retry_after:g}s; {MAX_WAIT_SECONDS}s at most)",
        )  # fmt: skip
        try:
            if not self._load().enforce:
                return  # shadow limits only: nothing to pause; the error stays the task's
            self.buckets.pause(seconds)
            self._count("paused")
            signals.limit_paused.send(
                sender=self.task, task_id=self.task.request.id, limits=self.names, seconds=seconds
            )
            self._book(DeferralReason.RATE_LIMITED, may_run=False)
        except BackendUnavailable as err:
            # Cannot pause the fleet; at least this task waits what it was told.
            self._backend_error(err, at_least=seconds)

    # Decisions ------------------------------------------------------------

    def _arrive(self) -> None:
        """Back at a booked slot: redeem the ticket left when it was booked."""
        redemption = self.buckets.redeem(self.task.request.id, GRACE_S, _SPIN_S)
        verdict, wait = redemption.verdict, redemption.wait
        if verdict is Verdict.GO:
            _wait_briefly(wait)
            self._admitted("booked")
        elif verdict is Verdict.EARLY:
            self._defer(wait, DeferralReason.EARLY, booked=True, redis_now=redemption.server_time)
        else:
            # Late (running now would bunch up with the tasks booked after
            # it), void (a pause or a reset came after the booking) or no
            # ticket at all: book again.  A missed slot is forfeit, so the
            # limit errs on the safe side.
            self._book(_REBOOK[verdict])

    def _book(self, reason: DeferralReason, may_run: bool = True) -> None:
        decision = self.buckets.book(self.cost, max_wait=self._budget_left())
        if not decision.allowed:
            raise ThrottleDeferralExpired(
                f"{self.task.name}[{self.task.request.id}]: next slot of {self._label()} is "
                f"{decision.retry_after:.1f}s away, beyond throttle_max_defer={self.settings.max_defer:g}s"
            )
        wait = decision.retry_after
        if may_run and wait <= _SPIN_S:
            _wait_briefly(wait)
            self._admitted("now")
            return
        self.buckets.issue_ticket(self.task.request.id, decision)
        self._defer(wait, reason, booked=True, redis_now=decision.server_time)

    def _budget_left(self) -> float:
        """Seconds this task may still wait (``throttle_max_defer``), within what a booking allows."""
        limit = min(self.settings.max_defer, float(MAX_WAIT_SECONDS))
        if self.since is None:
            return limit
        # Clamped both ways: ``since`` came from another host's clock.
        return min(limit, max(0.0, limit - (time.time() - self.since)))

    def _admitted(self, paid: Paid) -> None:
        if self.shadow is not None and self.effective is not None:
            self._shadow_check(self.shadow, self.effective.shadow)
        self._count(f"admitted:{paid}")
        if self.runtime.metrics is not None:
            waited = max(0.0, time.time() - self.since) if self.since is not None else 0.0
            self.runtime.metrics.wait(self.limit_names, waited)
        logger.debug("%s[%s] admitted by %s (%s)", self.task.name, self.task.request.id, self._label(), paid)
        signals.task_admitted.send(
            sender=self.task, task_id=self.task.request.id, limits=self.names, paid=paid, deferrals=self.deferrals
        )

    def _shadow_check(self, buckets: TokenBucket | MultiBucket, shadow: tuple[tuple[str, Limit], ...]) -> None:
        """A shadow-mode limit decides too, but only counts a refusal."""
        decision = buckets.consume(min(self.cost, *(limit.burst for _, limit in shadow)))
        if decision.allowed:
            return
        shadow_names = [name for name, _ in shadow]
        logger.info(
            "%s[%s] would be deferred %.3fs by %s (shadow mode: runs now)",
            self.task.name, self.task.request.id, decision.retry_after, self._label(shadow_names),
        )  # fmt: skip
        if self.runtime.metrics is not None:
            self.runtime.metrics.count([limit_of(n) for n in shadow_names], "shadow_refused")
        signals.shadow_refused.send(
            sender=self.task, task_id=self.task.request.id, limits=shadow_names, wait=decision.retry_after
        )

    def _backend_error(self, exc: BackendUnavailable, at_least: float = 0.0) -> None:
        policy = self.settings.on_backend_error
        task, request = self.task, self.task.request
        self._count(f"backend_errors:{policy}")
        signals.backend_error.send(sender=task, task_id=request.id, limits=self.names, error=exc, policy=policy)
        if policy == "allow" and not at_least:
            logger.warning("%s[%s] runs unthrottled: %s", task.name, request.id, exc)
            return
        if policy == "fail":
            logger.error("%s[%s] fails: %s", task.name, request.id, exc)
            raise exc
        low, high = _BACKEND_BACKOFF_S
        wait = max(at_least, min(high, low * 2 ** min(self.deferrals, 10)) * random.uniform(0.5, 1.0))
        if self._budget_left() < wait:
            raise ThrottleDeferralExpired(
                f"{task.name}[{request.id}]: Redis unavailable for longer than "
                f"throttle_max_defer={self.settings.max_defer:g}s: {exc}"
            ) from exc
        self._defer(wait, DeferralReason.BACKEND)

    def _defer(self, wait: float, reason: DeferralReason, booked: bool = False, redis_now: float | None = None) -> None:
        """Send this task again to run in ``wait`` seconds, then end this run.

        ``booked``: a ticket for its slot is in Redis (the slot header is for
        people reading the message; the gate trusts only the ticket).
        ``redis_now``: the Redis time ``wait`` counts from, so that workers
        read the arrival on Redis' clock, not their own (``ThrottleRequest``).
        """
        task, request = self.task, self.task.request
        countdown = min(max(0.0, wait - _LEAD_S) if booked else wait, self.settings.max_countdown)
        versions = (self.effective.versions if self.effective else "") if booked else None
        resend(task, self.args, self.kwargs, self.stamp, wait, countdown, versions, redis_now)
        logger.info(
            "%s[%s] deferred %.3fs (%s, deferral %d, limits %s)",
            task.name, request.id, wait, reason.value, self.deferrals + 1, self._label(),
        )  # fmt: skip
        self._count(f"deferred:{reason.value}")
        signals.task_deferred.send(
            sender=task,
            task_id=request.id,
            limits=self.names,
            wait=wait,
            reason=reason.value,
            deferrals=self.deferrals + 1,
        )
        raise Ignore()


#: Why a task books again, by what its ticket said.
_REBOOK = {
    Verdict.NONE: DeferralReason.UNBOOKED,
    Verdict.LATE: DeferralReason.LATE,
    Verdict.PAUSED: DeferralReason.PAUSED,
    Verdict.RESET: DeferralReason.RESET,
}
