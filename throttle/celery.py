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
from .bucket import UNAVAILABLE, MultiBucket, TokenBucket
from .celery_settings import NamedLimit, ThrottleSettings, check_limit_name, settings_for
from .checks import check_cost
from .connect import client_from_url
from .errors import BackendUnavailable, RateLimited, ThrottleError
from .limit import Limit
from .live import LiveLimits, LiveState, versioned
from .metrics import MetricsRecorder, limit_of

__all__ = [
    "ThrottledTask",
    "ThrottleDeferralExpired",
    "HEADER_DEFERRALS",
    "HEADER_SLOT",
    "HEADER_SINCE",
    "HEADER_VERSIONS",
]

logger = logging.getLogger("throttle")

#: Message headers the gate adds when it defers a task.  Celery hands custom
#: headers back as attributes of ``task.request``.
HEADER_DEFERRALS = "throttle_deferrals"  # how many times this task was deferred
HEADER_SLOT = "throttle_slot"  # the booked slot, Redis time in microseconds
HEADER_SINCE = "throttle_since"  # wall-clock time of the first deferral
HEADER_VERSIONS = "throttle_versions"  # the limits' live versions the slot was booked under

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

    def tenant(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        if self.key_fn is None:
            return None
        value = self.key_fn(*args, **kwargs)
        if not isinstance(value, str) or not value:
            raise ValueError(f"throttle_key must return a non-empty str, got {value!r}")
        return value

    def bucket_names(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
        """The configured buckets' names (version 0); see ``_Effective`` for live ones."""
        tenant = self.tenant(args, kwargs)
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


@dataclass(frozen=True)
class _Effective:
    """A task's limits as the fleet runs them now: live overrides applied."""

    enforce: tuple[tuple[str, Limit], ...]  # (bucket name, limit) decided before the body
    shadow: tuple[tuple[str, Limit], ...]  # (bucket name, limit) only counted
    versions: str  # the enforced limits' versions, e.g. "0,3": a booked slot's stamp
    pause_left: float  # seconds left of an operator's pause (the longest)


class _Runtime:
    """Per process: one Redis client (made after fork), the live limits, the
    buckets in use and the metrics recorder."""

    def __init__(self, settings: ThrottleSettings) -> None:
        self.settings = settings
        self.redis = client_from_url(settings.redis_url, **settings.redis_options)
        self.live = LiveLimits(self.redis, settings.prefix)
        self.metrics = MetricsRecorder(self.redis, settings.prefix) if settings.metrics else None
        self._buckets: dict[tuple[tuple[str, int, int], ...], TokenBucket | MultiBucket] = {}
        self._lock = threading.Lock()
        self._published = False

    def publish(self) -> None:
        """Tell ``throttle list`` which limits this fleet's config has (once)."""
        if self._published:
            return
        self._published = True
        try:
            self.live.publish_configured(self.settings.limits)
        except Exception as exc:  # Redis down: the gate will say so; the CLI can wait
            logger.debug("could not publish the configured limits: %s", exc)

    def state(self) -> LiveState:
        """The live limits; the configured ones if they cannot be read.

        Redis down: ``BackendUnavailable`` (the decision could not be made
        either).  Anything else (a hand-edited key, a proxy refusing a
        command): log it and decide by the configured limits: a broken
        override must never fail tasks.
        """
        try:
            return self.live.state()
        except UNAVAILABLE as exc:
            raise BackendUnavailable("live limits", exc) from exc
        except Exception:
            logger.exception("cannot read the live limits; deciding by the configured ones")
            return self.live.fall_back()

    def effective(self, plan: _Plan, tenant: str | None, state: LiveState) -> _Effective:
        enforce: list[tuple[str, Limit]] = []
        shadow: list[tuple[str, Limit]] = []
        versions: list[str] = []
        for nl in plan.limits:
            limit, mode = nl.limit, nl.mode
            override = state.overrides.get(nl.name)
            if override is not None:
                try:
                    limit, mode = override.apply(limit, mode)
                except (TypeError, ValueError) as exc:  # checked when set; a hand-written one may be wrong
                    logger.error("ignoring the live override of %s: %s", nl.name, exc)
            version = state.versions.get(nl.name, 0)
            name = versioned(nl.name, version)
            if tenant is not None and nl.per_key:
                name = f"{name}:{tenant}"
            if mode == "shadow":
                shadow.append((name, limit))
            else:
                enforce.append((name, limit))
                versions.append(str(version))
        return _Effective(
            tuple(enforce),
            tuple(shadow),
            ",".join(versions),
            max(state.pause_left(nl.name) for nl in plan.limits),
        )

    def buckets(self, parts: Sequence[tuple[str, Limit]]) -> TokenBucket | MultiBucket:
        key = tuple((name, limit.interval_us, limit.tau_us) for name, limit in parts)
        found = self._buckets.get(key)
        if found is None:
            made = [TokenBucket(self.redis, name, rate=limit, prefix=self.settings.prefix) for name, limit in parts]
            found = made[0] if len(made) == 1 else MultiBucket(made)
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

    buckets: TokenBucket | MultiBucket  # the enforced limits' buckets, set by _load()

    def __init__(self, task: ThrottledTask, plan: _Plan, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.plan = plan
        self.args = args
        self.kwargs = kwargs
        self.runtime = _runtime(task.app)
        self.settings = self.runtime.settings
        self.tenant = plan.tenant(args, kwargs)
        self.cost = plan.cost_for(args, kwargs)
        # Until the live state is read: the configured limits.
        self.names = plan.bucket_names(args, kwargs)
        self.limit_names = tuple(nl.name for nl in plan.limits)
        self.effective: _Effective | None = None
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

    def _load(self) -> _Effective:
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
                self._defer(min(effective.pause_left, _PAUSE_HOP_S), "paused", None)
            if not effective.enforce:
                self._admitted("now")  # shadow limits only: count, never defer
            elif self.slot_us is not None and self.slot_versions not in (None, effective.versions):
                # Booked under a limit that has changed since: book again
                # in the new bucket.
                self._book("changed")
            elif self.slot_us is not None:
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
            if not self._load().enforce:
                # Shadow limits only: nothing to pause; let the error be the task's.
                raise exc
            self.buckets.pause(exc.retry_after)
            self._count("paused")
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
        if self.shadow is not None:
            self._shadow_check()
        self._count(f"admitted:{paid}")
        if self.runtime.metrics is not None:
            waited = max(0.0, time.time() - self.since) if self.since is not None else 0.0
            self.runtime.metrics.wait(self.limit_names, waited)
        logger.debug("%s[%s] admitted by %s (%s)", self.task.name, self.task.request.id, ",".join(self.names), paid)
        signals.task_admitted.send(
            sender=self.task, task_id=self.task.request.id, limits=self.names, paid=paid, deferrals=self.deferrals
        )

    def _shadow_check(self) -> None:
        """A shadow-mode limit decides too, but only counts a refusal."""
        assert self.shadow is not None and self.effective is not None
        shadow = self.effective.shadow
        decision = self.shadow.consume(min(self.cost, *(limit.burst for _, limit in shadow)))
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
        self._defer(wait, "backend", None)

    def _defer(self, wait: float, reason: str, slot_us: int | None) -> None:
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
            task.name, request.id, wait, reason, self.deferrals + 1, ",".join(self.names),
        )  # fmt: skip
        self._count(f"deferred:{reason}")
        signals.task_deferred.send(
            sender=task, task_id=request.id, limits=self.names, wait=wait, reason=reason, deferrals=self.deferrals + 1
        )
        raise Ignore()
