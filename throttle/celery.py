"""``ThrottledTask``: a Celery base class that makes a whole fleet share one limit.

::

    app.conf.throttle_limits = {"github": {"rate": "10/s", "burst": 5}}

    @app.task(base=ThrottledTask, throttle="github")
    def fetch(repo): ...

The gate runs in ``Task.before_start``, in the pool process, after the task
was received and before its body.  With a token in the bucket it costs one
Redis round trip and the body runs.  With the bucket empty it books the
task's slot (``reserve``), sends the same task again with that countdown
(same id, same ``request.retries``, a deferral count in its headers) and ends
this run with ``Ignore``: the retry budget is untouched and no pool slot
sleeps.  When the task comes back it checks, on Redis' clock, that its slot
has come, and runs without paying again.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from celery import Celery, Task
from celery.exceptions import Ignore

from . import signals
from .bucket import MultiBucket, TokenBucket
from .celery_settings import NamedLimit, ThrottleSettings, check_limit_name, settings_for
from .checks import check_cost
from .connect import client_from_url
from .errors import BackendUnavailable, RateLimited, ThrottleError
from .limit import Limit

__all__ = ["ThrottledTask", "ThrottleDeferralExpired", "HEADER_DEFERRALS", "HEADER_SLOT", "HEADER_SINCE"]

logger = logging.getLogger("throttle")

#: Message headers the gate adds when it defers a task.  Celery hands custom
#: headers back as attributes of ``task.request``.
HEADER_DEFERRALS = "throttle_deferrals"  # how many times this task was deferred
HEADER_SLOT = "throttle_slot"  # the booked slot, Redis time in microseconds
HEADER_SINCE = "throttle_since"  # wall-clock time of the first deferral

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


class ThrottleDeferralExpired(ThrottleError):
    """A task would wait longer than ``throttle_max_defer`` in total; it fails."""


@dataclass(frozen=True)
class _Plan:
    """A task's throttle options, resolved against the app's settings."""

    limits: tuple[NamedLimit, ...]
    key_fn: Callable[..., object] | None
    cost: int | Callable[..., object]

    @property
    def min_burst(self) -> int:
        return min(nl.limit.burst for nl in self.limits)

    @property
    def grace(self) -> float:
        """How late a task may still start at its booked slot: two emission
        intervals of its strictest limit (10 ms to 1 s).  Any 1 s window then
        holds at most two starts more than the slots in it; a task later than
        that books again rather than bunch up with the tasks after it."""
        interval = min(nl.limit.interval_us for nl in self.limits) / 1e6
        return min(1.0, max(0.01, 2 * interval))

    def cost_for(self, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
        if callable(self.cost):
            return check_cost(self.cost(*args, **kwargs), self.min_burst, "throttle_cost")
        return self.cost

    def bucket_names(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
        tenant: str | None = None
        if self.key_fn is not None:
            value = self.key_fn(*args, **kwargs)
            if not isinstance(value, str) or not value:
                raise ValueError(f"throttle_key must return a non-empty str, got {value!r}")
            tenant = value
        return [f"{nl.name}:{tenant}" if tenant is not None and nl.per_key else nl.name for nl in self.limits]


def _resolve(
    task_name: str, spec: object, burst: object, key_fn: object, cost: object, settings: ThrottleSettings
) -> _Plan:
    """Check a task's options; every error names the option and the task."""
    where = f"task {task_name!r}"
    items: list[object] = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError(f"{where}: throttle must name at least one limit, got {spec!r}")
    limits: list[NamedLimit] = []
    for item in items:
        if isinstance(item, Limit):
            limits.append(NamedLimit(f"task.{task_name}", item))
        elif isinstance(item, str) and item in settings.limits:
            limits.append(settings.limits[item])
        elif isinstance(item, str) and item[:1].isdigit():
            try:
                limit = Limit(item, 1 if burst is None else cast(int, burst))  # checked by Limit
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: throttle={item!r}: {exc}") from exc
            limits.append(NamedLimit(f"task.{task_name}", limit))
        elif isinstance(item, str):
            known = ", ".join(sorted(settings.limits)) or "none configured"
            check_limit_name(item, f"{where}: throttle")
            raise ValueError(f"{where}: throttle={item!r} is not in throttle_limits ({known}) and is not a rate")
        else:
            raise TypeError(f"{where}: throttle must be a limit name, a rate like '10/s' or a Limit, got {item!r}")
    names = [nl.name for nl in limits]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: throttle names a limit twice: {names}")
    if key_fn is not None and not callable(key_fn):
        raise TypeError(f"{where}: throttle_key must be a callable(*args, **kwargs) -> str, got {key_fn!r}")
    plan = _Plan(tuple(limits), cast(Callable[..., object] | None, key_fn), 1)
    if callable(cost):
        return _Plan(plan.limits, plan.key_fn, cost)
    return _Plan(plan.limits, plan.key_fn, check_cost(cost, plan.min_burst, f"{where}: throttle_cost"))


class _Runtime:
    """Per process: one Redis client (made after fork) and the buckets in use."""

    def __init__(self, settings: ThrottleSettings) -> None:
        self.settings = settings
        self.redis = client_from_url(settings.redis_url, **settings.redis_options)
        self._buckets: dict[tuple[str, ...], TokenBucket | MultiBucket] = {}
        self._lock = threading.Lock()

    def buckets(self, plan: _Plan, names: list[str]) -> TokenBucket | MultiBucket:
        key = tuple(names)
        found = self._buckets.get(key)
        if found is None:
            parts = [
                TokenBucket(self.redis, name, rate=nl.limit, prefix=self.settings.prefix)
                for name, nl in zip(names, plan.limits, strict=True)
            ]
            found = parts[0] if len(parts) == 1 else MultiBucket(parts)
            with self._lock:
                if len(self._buckets) > 10_000:  # many tenants: do not grow forever
                    self._buckets.clear()
                self._buckets[key] = found
        return found


_runtimes: dict[tuple[int, int], _Runtime] = {}
_runtimes_lock = threading.Lock()


def _runtime(app: Celery) -> _Runtime:
    # Keyed by pid too: a prefork child must not use its parent's sockets.
    ident = (id(app), os.getpid())
    rt = _runtimes.get(ident)
    if rt is None:
        with _runtimes_lock:
            rt = _runtimes.get(ident)
            if rt is None:
                rt = _Runtime(settings_for(app))
                _runtimes[ident] = rt
    return rt


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get(name)
    return value


class ThrottledTask(Task):  # type: ignore[misc]
    """A Celery task that waits for its turn in a fleet-wide Redis token bucket.

    Options (``@app.task(base=ThrottledTask, ...)`` keywords or class
    attributes):

    - ``throttle``: a limit name from ``throttle_limits``, an inline rate such
      as ``"10/s"`` (with ``throttle_burst``), a ``Limit``, or a list of these
      decided all-or-nothing;
    - ``throttle_burst``: the burst of an inline rate (default 1);
    - ``throttle_key``: ``callable(*args, **kwargs) -> str``, one bucket per
      key (tenant, account) for every limit with ``per_key`` (the default);
    - ``throttle_cost``: tokens per call, an int or ``callable(*args, **kwargs)``.

    Eager runs (``task.apply()``, ``task_always_eager``) and direct calls
    (``task(...)``) are not throttled.
    """

    throttle: Any = None
    throttle_burst: int | None = None
    throttle_key: Callable[..., object] | None = None
    throttle_cost: int | Callable[..., object] = 1

    _throttle_plan: _Plan | None = None

    @classmethod
    def bind(cls, app: Celery) -> Any:
        bound = super().bind(app)
        # Resolve (and so check) the options when the app is finalized: a
        # worker with a bad limit fails at start, not at its first task.
        if cls.throttle is None:
            raise ValueError(
                f"task {cls.name!r} has base=ThrottledTask but no throttle option: name a limit, "
                "e.g. @app.task(base=ThrottledTask, throttle='github')"
            )
        cls._throttle_plan = _resolve(
            cls.name or cls.__name__,
            cls.throttle,
            cls.throttle_burst,
            cls.throttle_key,
            cls.throttle_cost,
            settings_for(app),
        )
        return bound

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # Producers fail fast too: a cost or key the bucket would refuse is
        # refused before the message is sent.
        plan = self._throttle_plan
        if plan is not None and not self.app.conf.task_always_eager:
            call_args, call_kwargs = list(args or ()), dict(kwargs or {})
            plan.cost_for(call_args, call_kwargs)
            plan.bucket_names(call_args, call_kwargs)
        return super().apply_async(args, kwargs, **options)

    # -- the gate ---------------------------------------------------------

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        request = self.request
        plan = self._throttle_plan
        if plan is None or request.is_eager or request.called_directly:
            return
        _Gate(self, plan, list(args or ()), dict(kwargs or {})).admit()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager or self._throttle_plan is None:
            return super().__call__(*args, **kwargs)
        # The worker's tracer already pushed this task's request; calling
        # self.run keeps it (Task.__call__ would push an empty one).
        try:
            return self.run(*args, **kwargs)
        except RateLimited as exc:
            _Gate(self, self._throttle_plan, list(args), dict(kwargs)).rate_limited(exc)
            raise  # not reached: rate_limited() always raises


class _Gate:
    """One decision for one delivery of one task."""

    def __init__(self, task: ThrottledTask, plan: _Plan, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.plan = plan
        self.args = args
        self.kwargs = kwargs
        self.runtime = _runtime(task.app)
        self.settings = self.runtime.settings
        self.names = plan.bucket_names(args, kwargs)
        self.cost = plan.cost_for(args, kwargs)
        self.buckets = self.runtime.buckets(plan, self.names)
        request = task.request
        self.deferrals = int(_header(request, HEADER_DEFERRALS) or 0)
        slot = _header(request, HEADER_SLOT)
        self.slot_us = int(slot) if slot is not None else None
        since = _header(request, HEADER_SINCE)
        self.since = float(since) if since is not None else None

    # The two entry points -------------------------------------------------

    def admit(self) -> None:
        """Return to run the body; raise ``Ignore`` after re-sending the task."""
        try:
            if self.slot_us is not None:
                self._arrive(self.slot_us)
            else:
                self._book("empty")
        except BackendUnavailable as exc:
            self._backend_error(exc)

    def rate_limited(self, exc: RateLimited) -> None:
        """The body hit the remote API's limit: pause the fleet, defer this task."""
        logger.warning(
            "%s[%s] remote API rate limited: pausing %s for %.3fs",
            self.task.name, self.task.request.id, ",".join(self.names), exc.retry_after,
        )  # fmt: skip
        try:
            self.buckets.pause(exc.retry_after)
            signals.limit_paused.send(
                sender=self.task, task_id=self.task.request.id, limits=self.names, seconds=exc.retry_after
            )
            self._book("rate_limited")
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
            self._book("paused")
            return
        wait = slot - now
        if wait > _SPIN_S:
            self._defer(wait, "early", slot_us)
        if -wait > self.plan.grace:
            # Missed its turn (a busy worker or a backlog in the broker held
            # it back): running now would bunch up with the tasks booked
            # after it.  Book again; the missed token is forfeit, so the limit
            # errs on the safe side.
            self._book("late")
            return
        if not _sleep_briefly(wait):
            self._defer(wait, "early", slot_us)
        self._admitted("booked")

    def _book(self, reason: str) -> None:
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

    def _admitted(self, paid: str) -> None:
        logger.debug("%s[%s] admitted by %s (%s)", self.task.name, self.task.request.id, ",".join(self.names), paid)
        signals.task_admitted.send(
            sender=self.task, task_id=self.task.request.id, limits=self.names, paid=paid, deferrals=self.deferrals
        )

    def _backend_error(self, exc: BackendUnavailable, at_least: float = 0.0) -> None:
        policy = self.settings.on_backend_error
        task, request = self.task, self.task.request
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
        self._defer(wait, "backend", None)

    def _defer(self, wait: float, reason: str, slot_us: int | None) -> None:
        """Send this task again to run in ``wait`` seconds, then end this run."""
        task, request = self.task, self.task.request
        countdown = min(wait, self.settings.max_countdown)
        headers = {
            HEADER_DEFERRALS: self.deferrals + 1,
            HEADER_SINCE: self.since if self.since is not None else time.time(),
        }
        if slot_us is not None:
            headers[HEADER_SLOT] = slot_us
        # Same id, same request.retries, same routing, links and chain: only
        # the countdown and throttle's headers change.
        signature = task.signature_from_request(request, self.args, self.kwargs)
        merged = {**(signature.options.get("headers") or {}), **headers}
        if slot_us is None:
            merged.pop(HEADER_SLOT, None)
        signature.apply_async(countdown=countdown, headers=merged, retry=True, retry_policy=_PUBLISH_RETRY)
        logger.info(
            "%s[%s] deferred %.3fs (%s, deferral %d, limits %s)",
            task.name, request.id, wait, reason, self.deferrals + 1, ",".join(self.names),
        )  # fmt: skip
        signals.task_deferred.send(
            sender=task, task_id=request.id, limits=self.names, wait=wait, reason=reason, deferrals=self.deferrals + 1
        )
        raise Ignore()
