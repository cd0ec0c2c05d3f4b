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
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from celery.exceptions import Ignore
from redis.exceptions import RedisError

from ..bucket import MultiBucket, TokenBucket
from ..errors import BackendUnavailable, RateLimited, ThrottleDeferralExpired
from ..keys import limit_of, room_of_bucket
from ..limit import MAX_WAIT_SECONDS, Limit
from ..room import ARRIVAL_MEMORY_S
from ..tickets import Verdict
from . import signals
from .deferral import (
    HEADER_PARKED,
    DeferralReason,
    Deferred,
    Stamp,
    backend_backoff,
    budget_left,
    outgoing,
    resend,
    store_deferred,
)
from .options import TaskPlan
from .parking import pack
from .runtime import Effective, runtime_for

if TYPE_CHECKING:
    from celery import Task

    from ..live_state import LiveState
    from .leases import LeaseRider

__all__ = ["Gate", "Paid", "GRACE_S", "EPSILON_S", "LEAD_S", "SPIN_S"]

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
#: 50 ms: deferred tasks come back up to ~40 ms early on a loaded host (the
#: worker's ETA timer and pool dispatch); at 25 ms each of those went round
#: the broker once more and often came back late (measured with `make demo`:
#: 2 deferrals per task instead of 1.2).
SPIN_S = 0.05

#: A deferred task is sent to arrive this much before its slot (broker and
#: timer latency), then waits the rest in place (less than SPIN_S).  30 ms:
#: at 15 ms, once each worker's clock offset was measured exactly (best of
#: several round trips), 11-13 of 200 fleet-test tasks on a loaded 2-core
#: host came back over GRACE_S late and forfeited their slots; at 30 ms, 1-7.
LEAD_S = 0.03


def _wait_briefly(seconds: float) -> None:
    """Wait out a slot at most ``SPIN_S`` away, in place.

    Some hosts refuse a short sleep (seen under libfaketime: EINVAL); there
    the wait is spun out on the monotonic clock instead (at most SPIN_S of
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

    def __init__(
        self, task: Task, plan: TaskPlan, args: list[Any], kwargs: dict[str, Any], rider: LeaseRider | None = None
    ) -> None:
        self.task = task
        #: A concurrency lease to take in this delivery's first booking call (one round trip for both).
        self.rider = rider
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
        self.state: LiveState | None = None
        self.rechecked = False
        self.loaded_at = 0.0
        self.shadow: TokenBucket | MultiBucket | None = None
        self.stamp = Stamp.read(task.request)
        self.deferrals, self.since = self.stamp.deferrals, self.stamp.since
        self.runtime.publish()

    def _load(self, at: float | None = None) -> Effective:
        """Apply the live state: effective limits, their buckets, the pause (as of Redis time ``at``, if given)."""
        if at is None or self.state is None:
            self.state = self.runtime.state()
        self.loaded_at = self.state.now() if at is None else at  # the Redis time the limits were read for
        effective = self.runtime.effective(self.plan, self.tenant, self.state, at)
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
            if self.stamp.released is not None:
                self._first_copy(*self.stamp.released)
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
        already ran, so running it again needs a token of its own.  A task
        with only a concurrency limit is deferred by ``retry_after`` (no
        bucket to pause).  Returns (without deferring) only when no limit of
        the task is enforced.
        """
        seconds = min(exc.retry_after, float(MAX_WAIT_SECONDS))
        logger.warning(
            "%s[%s] remote API rate limited: pausing %s for %.3fs%s",
            self.task.name, self.task.request.id, self._label(), seconds,
            "" if seconds == exc.retry_after else f" (asked {exc.retry_after:g}s; {MAX_WAIT_SECONDS}s at most)",
        )  # fmt: skip
        try:
            if not self._load().enforce:
                if self.plan.leases:
                    # A concurrency limit only: no bucket to pause; this
                    # task waits what it was told (its lease is given back
                    # as the body ended), at no cost to its retries.
                    self._defer(seconds, DeferralReason.RATE_LIMITED)
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

    def _first_copy(self, room: str, park: str, copy: str) -> None:
        """Released from the waiting room: run only the first copy of this park's release to arrive.

        A releaser killed after publishing and before acknowledging leaves
        the entry to be published again; the second copy is dropped here.
        Copies are told apart per park (``park``): a task that parks again
        is released again, and that release is a first copy of its own.
        """
        entry = f"{self.task.request.id}:{park}"
        try:
            if self.runtime.room.first_arrival(room, entry, copy, ARRIVAL_MEMORY_S):
                return
        except RedisError:
            return  # the decision that follows meets the same Redis and its policy
        logger.warning(
            "%s[%s] dropped: a second copy of a task released from the waiting room %r",
            self.task.name, self.task.request.id, room,
        )  # fmt: skip
        self._count("duplicates")
        raise Ignore()

    def _arrive(self) -> None:
        """Back at a booked slot: redeem the ticket left when it was booked."""
        redemption = self.buckets.redeem(self.task.request.id, GRACE_S, SPIN_S)
        replied = time.monotonic()
        verdict, wait = redemption.verdict, redemption.wait
        if verdict is Verdict.GO:
            change = self._change_near(redemption.server_time + max(0.0, wait))
            if change is not None:
                # The body may start after a change: the ticket was for the
                # limit before it.  Wait for the change, book in its bucket.
                _wait_briefly(change - redemption.server_time - (time.monotonic() - replied))
                self._book(DeferralReason.CHANGED)
                return
            self._run_at(wait, replied, "booked")
        elif verdict is Verdict.EARLY:
            self._defer(wait, DeferralReason.EARLY, booked=True, redis_now=redemption.server_time)
        else:
            # Late (running now would bunch up with the tasks booked after
            # it), void (a pause or a reset came after the booking) or no
            # ticket at all: book again.  A missed slot is forfeit, so the
            # limit errs on the safe side.
            self._book(_REBOOK[verdict])

    def _book(self, reason: DeferralReason, may_run: bool = True) -> None:
        if self.rider is not None and self.rider.pending:
            decision = self.rider.book(self.buckets, self.cost, self._budget_left())  # or LeaseRefused
        else:
            decision = self.buckets.book(self.cost, max_wait=self._budget_left())
        replied = time.monotonic()
        if not decision.allowed:
            raise ThrottleDeferralExpired(
                f"{self.task.name}[{self.task.request.id}]: next slot of {self._label()} is "
                f"{decision.retry_after:.1f}s away, beyond throttle_max_defer={self.settings.max_defer:g}s"
            )
        wait = decision.retry_after
        if may_run and wait <= SPIN_S:
            change = self._change_near(decision.server_time + wait)
            if change is not None:
                # Until the change is in force, then decide in its bucket.
                _wait_briefly(change - decision.server_time - (time.monotonic() - replied))
                self._book(DeferralReason.CHANGED, may_run)
                return
            self._run_at(wait, replied, "now")
            return
        self.buckets.issue_ticket(self.task.request.id, decision)
        self._defer(wait, reason, booked=True, redis_now=decision.server_time)

    def _run_at(self, wait: float, replied: float, paid: Paid) -> None:
        """Wait out the slot in place (``wait`` from ``replied``, local monotonic), then run.

        Unless this process fell behind its slot since Redis said go: a
        thread starved of the GIL or a descheduled process can lose tens of
        ms after the reply, and running that late would bunch up with the
        tasks booked after it.  Then the slot is forfeit, as for a late
        arrival, and the task books again (deferred, never run at once).
        """
        _wait_briefly(wait)
        late = time.monotonic() - (replied + wait)
        if late > GRACE_S:
            logger.info("%s[%s] %.0f ms behind its slot after the decision: booking again",
                        self.task.name, self.task.request.id, late * 1000)  # fmt: skip
            self._book(DeferralReason.LATE, may_run=False)
            return
        self._admitted(paid)

    def _change_near(self, start: float) -> float | None:
        """The Redis time of a change the body may start after, or None (the limits decided by hold).

        ``start``: the Redis time the body would start at (the decision's
        time plus the wait in place).  The gate picks a limit's version by
        its estimate of Redis' clock, which lags when the process was
        descheduled after reading the live state; and a body admitted a few
        ms before a change starts after it, up to ``EPSILON_S`` later than
        planned (``GRACE_S`` of lateness, then the dispatch to the body).
        Either way the old bucket would admit while the fleet is on the new
        one.  So a change of these limits that takes effect before
        ``start + EPSILON_S`` counts: the limits are reloaded as of the
        change, and the caller waits for it and decides in its bucket.
        Once per delivery; costs nothing unless a change is that close.
        """
        if self.rechecked or self.state is None or self.effective is None:
            return None
        pending = self.state.pending
        horizon = start + EPSILON_S
        near = [
            pending[nl.name].at
            for nl in self.plan.limits
            if nl.name in pending and self.loaded_at < pending[nl.name].at <= horizon
        ]
        if not near:
            return None  # no change of these limits that close (the common case)
        at = max(near)
        if self.runtime.effective(self.plan, self.tenant, self.state, at).versions == self.effective.versions:
            return None
        self.rechecked = True
        self._load(at=at)
        return at

    def _budget_left(self) -> float:
        """Seconds this task may still wait (``throttle_max_defer``), within what a booking allows."""
        return budget_left(self.settings.max_defer, self.since)

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
        wait = max(at_least, backend_backoff(self.deferrals))
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
        versions = (self.effective.versions if self.effective else "") if booked else None
        park_after = self.settings.park_after
        parked = booked and redis_now is not None and park_after is not None and wait > park_after
        if parked:
            assert redis_now is not None and versions is not None
            parked = self._park(wait, redis_now, versions)
        if not parked:
            countdown = min(max(0.0, wait - LEAD_S) if booked else wait, self.settings.max_countdown)
            resend(task, self.args, self.kwargs, self.stamp, wait, countdown, versions, redis_now)
        logger.info(
            "%s[%s] %s %.3fs (%s, deferral %d, limits %s)",
            task.name, request.id, "parked" if parked else "deferred", wait, reason.value, self.deferrals + 1,
            self._label(),
        )  # fmt: skip
        self._count(f"deferred:{reason.value}")
        if parked:
            self._count("parked")
        signals.task_deferred.send(
            sender=task,
            task_id=request.id,
            limits=self.names,
            wait=wait,
            reason=reason.value,
            deferrals=self.deferrals + 1,
            parked=parked,
        )
        deferred = Deferred(wait, reason.value, self.deferrals + 1, parked)
        store_deferred(self.task, deferred)
        raise deferred

    def _park(self, wait: float, redis_now: float, versions: str) -> bool:
        """Keep the deferred task in the waiting room until shortly before its slot.

        The room is the first enforced limit's (its tenant's, if per key),
        without the version: parked tasks stay in it across live changes.
        """
        signature = outgoing(self.task, self.args, self.kwargs, self.stamp, wait, versions)
        signature.options["headers"][HEADER_PARKED] = uuid.uuid4().hex
        room = room_of_bucket(self.names[0])
        version = int(versions.split(",", 1)[0] or 0)
        try:
            self.runtime.room.park(room, self.task.request.id, redis_now + wait, pack(self.task, signature), version)
        except RedisError as exc:
            # The ticket is booked; a countdown message keeps the task instead.
            logger.warning("%s[%s] could not park in %r (%s): deferring with a countdown",
                           self.task.name, self.task.request.id, room, exc)  # fmt: skip
            return False
        return True


#: Why a task books again, by what its ticket said.
_REBOOK = {
    Verdict.NONE: DeferralReason.UNBOOKED,
    Verdict.LATE: DeferralReason.LATE,
    Verdict.PAUSED: DeferralReason.PAUSED,
    Verdict.RESET: DeferralReason.RESET,
}
