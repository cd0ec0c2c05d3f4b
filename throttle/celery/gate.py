"""The gate: one decision for one delivery of one throttled task.

It runs in ``ThrottledTask.before_start``, in the pool process, after the
task was received and before its body.  With a token in the bucket it costs
one Redis round trip and the body runs.  With the bucket empty it books the
task's slot, sends the same task again with that countdown (same id, same
``request.retries``, throttle's headers below) and ends this run with
``Ignore``: the retry budget is untouched and no pool slot sleeps.  When the
task comes back it checks, on Redis' clock, that its slot has come, and runs
without paying again.
"""

from __future__ import annotations

import logging
import random
import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from celery.exceptions import Ignore

from ..bucket import MultiBucket, TokenBucket
from ..errors import BackendUnavailable, RateLimited, ThrottleDeferralExpired
from ..keys import limit_of
from ..limit import Limit
from . import signals
from .options import TaskPlan
from .runtime import Effective, runtime_for

if TYPE_CHECKING:
    from celery import Task

__all__ = ["Gate", "DeferralReason", "Paid", "HEADER_DEFERRALS", "HEADER_SLOT", "HEADER_SINCE", "HEADER_VERSIONS"]

logger = logging.getLogger("throttle")

#: Message headers the gate adds when it defers a task.  Celery hands custom
#: headers back as attributes of ``task.request``.
HEADER_DEFERRALS = "throttle_deferrals"  # how many times this task was deferred
HEADER_SLOT = "throttle_slot"  # the booked slot, Redis time in microseconds
HEADER_SINCE = "throttle_since"  # wall-clock time of the first deferral
HEADER_VERSIONS = "throttle_versions"  # the limits' live versions the slot was booked under

#: How an admitted task paid: tokens taken at this delivery, or a slot booked earlier.
Paid = Literal["now", "booked"]


class DeferralReason(StrEnum):
    """Why a task was re-sent instead of run (signals, logs and metrics say this)."""

    EMPTY = "empty"  # no token: its slot was booked
    EARLY = "early"  # came back before its slot
    LATE = "late"  # came back too long after its slot: booked again
    CHANGED = "changed"  # its slot was booked under a limit that has changed since
    PAUSED = "paused"  # the limit is paused (an operator, or a 429 after the booking)
    RATE_LIMITED = "rate_limited"  # the body raised RateLimited
    BACKEND = "backend"  # Redis could not answer (policy "defer")


#: While an operator's pause lasts, waiting tasks look again this often, so
#: that a ``throttle resume`` lets them run within seconds.
_PAUSE_HOP_S = 2.0

#: A slot this close is waited for in place: cheaper than a broker round trip.
_SPIN_S = 0.01

#: While Redis is down, "defer" re-sends with these countdowns (doubling).
_BACKEND_BACKOFF_S = (1.0, 30.0)

#: How hard a deferral tries to publish before giving up (the message was
#: already acknowledged with early acks, so publishing is what keeps it).
_PUBLISH_RETRY = {"max_retries": 30, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 5.0}


def _sleep_briefly(seconds: float) -> bool:
    """Wait out a slot a few milliseconds away; False if this host cannot.

    Some environments refuse a short sleep (seen under libfaketime: EINVAL);
    the caller then defers the task to its slot instead of failing it.
    """
    if seconds <= 0:
        return True
    try:
        time.sleep(seconds)
    except OSError:
        logger.warning("could not sleep %.4fs on this host; deferring instead", seconds)
        return False
    return True


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(name)
    return value


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
        request = task.request
        self.deferrals = int(_header(request, HEADER_DEFERRALS) or 0)
        slot = _header(request, HEADER_SLOT)
        self.slot_us = int(slot) if slot is not None else None
        since = _header(request, HEADER_SINCE)
        self.since = float(since) if since is not None else None
        versions = _header(request, HEADER_VERSIONS)
        # None: booked by a version of throttle without live limits.
        self.slot_versions = str(versions) if versions is not None else None
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
                    self.task.name, self.task.request.id, self.cost, ",".join(self.names), burst, burst,
                )  # fmt: skip
                self.cost = burst
        if effective.shadow:
            self.shadow = self.runtime.buckets(effective.shadow)
        return effective

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
                # seconds; a booked slot is void (its token forfeit).
                self._defer(min(effective.pause_left, _PAUSE_HOP_S), DeferralReason.PAUSED, None)
            if not effective.enforce:
                self._admitted("now")  # shadow limits only: count, never defer
            elif self.slot_us is not None and self.slot_versions not in (None, effective.versions):
                # Booked under a limit that has changed since: book again
                # in the new bucket.
                self._book(DeferralReason.CHANGED)
            elif self.slot_us is not None:
                self._arrive(self.slot_us)
            else:
                self._book(DeferralReason.EMPTY)
        except BackendUnavailable as exc:
            self._backend_error(exc)

    def rate_limited(self, exc: RateLimited) -> None:
        """The body hit the remote API's limit: pause the fleet, defer this task."""
        logger.warning(
            "%s[%s] remote API rate limited: pausing %s for %.3fs",
            self.task.name, self.task.request.id, ",".join(self.names), exc.retry_after,
        )  # fmt: skip
        try:
            if not self._load().enforce:
                # Shadow limits only: nothing to pause; let the error be the task's.
                raise exc
            self.buckets.pause(exc.retry_after)
            self._count("paused")
            signals.limit_paused.send(
                sender=self.task, task_id=self.task.request.id, limits=self.names, seconds=exc.retry_after
            )
            self._book(DeferralReason.RATE_LIMITED)
        except BackendUnavailable as err:
            # Cannot pause the fleet; at least this task waits what it was told.
            self._backend_error(err, at_least=exc.retry_after)

    # Decisions ------------------------------------------------------------

    def _arrive(self, slot_us: int) -> None:
        """Back at a booked slot: run if it has come and no pause began since."""
        now, paused_until = self.buckets.slot_status()
        slot = slot_us / 1e6
        if paused_until > slot:
            # A 429 paused the limit after this slot was booked: the slot is
            # void (its token is forfeit: the limit errs on the safe side).
            self._book(DeferralReason.PAUSED)
            return
        wait = slot - now
        if wait > _SPIN_S:
            self._defer(wait, DeferralReason.EARLY, slot_us)
        if -wait > self.plan.grace:
            # Missed its turn (a busy worker or a backlog in the broker held
            # it back): running now would bunch up with the tasks booked
            # after it.  Book again; the missed token is forfeit, so the limit
            # errs on the safe side.
            self._book(DeferralReason.LATE)
            return
        if not _sleep_briefly(wait):
            self._defer(wait, DeferralReason.EARLY, slot_us)
        self._admitted("booked")

    def _book(self, reason: DeferralReason) -> None:
        max_wait = self._budget_left()
        decision = self.buckets.book(self.cost, max_wait=max_wait)
        if not decision.allowed:
            raise ThrottleDeferralExpired(
                f"{self.task.name}[{self.task.request.id}]: next slot of {','.join(self.names)} is "
                f"{decision.retry_after:.1f}s away, beyond throttle_max_defer={self.settings.max_defer:g}s"
            )
        wait = decision.retry_after
        slot_us = round((decision.server_time + wait) * 1_000_000)
        if wait <= _SPIN_S and _sleep_briefly(wait):
            self._admitted("now")
            return
        self._defer(wait, reason, slot_us)

    def _budget_left(self) -> float:
        if self.since is None:
            return self.settings.max_defer
        return max(0.0, self.settings.max_defer - (time.time() - self.since))

    def _admitted(self, paid: Paid) -> None:
        if self.shadow is not None and self.effective is not None:
            self._shadow_check(self.shadow, self.effective.shadow)
        self._count(f"admitted:{paid}")
        if self.runtime.metrics is not None:
            waited = max(0.0, time.time() - self.since) if self.since is not None else 0.0
            self.runtime.metrics.wait(self.limit_names, waited)
        logger.debug("%s[%s] admitted by %s (%s)", self.task.name, self.task.request.id, ",".join(self.names), paid)
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
            self.task.name, self.task.request.id, decision.retry_after, ",".join(shadow_names),
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
        self._defer(wait, DeferralReason.BACKEND, None)

    def _defer(self, wait: float, reason: DeferralReason, slot_us: int | None) -> None:
        """Send this task again to run in ``wait`` seconds, then end this run."""
        task, request = self.task, self.task.request
        countdown = min(wait, self.settings.max_countdown)
        headers: dict[str, Any] = {
            HEADER_DEFERRALS: self.deferrals + 1,
            HEADER_SINCE: self.since if self.since is not None else time.time(),
        }
        if slot_us is not None:
            headers[HEADER_SLOT] = slot_us
            headers[HEADER_VERSIONS] = self.effective.versions if self.effective else ""
        # Same id, same request.retries, same routing, links and chain: only
        # the countdown and throttle's headers change.
        signature = task.signature_from_request(request, self.args, self.kwargs)
        merged = {**(signature.options.get("headers") or {}), **headers}
        if slot_us is None:
            merged.pop(HEADER_SLOT, None)
            merged.pop(HEADER_VERSIONS, None)
        signature.apply_async(countdown=countdown, headers=merged, retry=True, retry_policy=_PUBLISH_RETRY)
        logger.info(
            "%s[%s] deferred %.3fs (%s, deferral %d, limits %s)",
            task.name, request.id, wait, reason.value, self.deferrals + 1, ",".join(self.names),
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
