"""``ThrottledTask``: the Celery base class whose tasks share the fleet's limits.

::

    app.conf.throttle_limits = {"github": {"rate": "10/s", "burst": 5}}

    @app.task(base=ThrottledTask, throttle="github")
    def fetch(repo): ...

The options are checked when the app is finalized (``bind``); the decision
itself is the gate's (``throttle.celery.gate``), run in ``before_start``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun

from ..errors import RateLimited
from ..semaphore import Lease
from . import lifecycle  # noqa: F401  (connects what a worker does at start and stop)
from .deferral import Deferred
from .gate import Gate
from .leases import LeaseAgain, LeaseRefused, LeaseRider, acquire_or_park, hold, release_held
from .options import TaskPlan, resolve_options
from .settings import settings_for

__all__ = ["ThrottledTask"]


class ThrottledTask(Task):  # type: ignore[misc]
    """A Celery task that waits for its turn in a fleet-wide Redis token bucket.

    Eager runs (``task.apply()``, ``task_always_eager``) and direct calls
    (``task(...)``) are not throttled.
    """

    #: A limit name from ``throttle_limits``, an inline rate such as ``"10/s"``
    #: (with ``throttle_burst``), a ``Limit``, or a list of these, decided
    #: all-or-nothing.
    throttle: Any = None

    #: The burst of an inline rate (default 1).
    throttle_burst: int | None = None

    #: ``callable(*args, **kwargs) -> str``: one bucket per key (tenant,
    #: account) for every limit with ``per_key`` (the default).
    throttle_key: Callable[..., object] | None = None

    #: Tokens per call: an int, or ``callable(*args, **kwargs) -> int``.
    throttle_cost: int | Callable[..., object] = 1

    #: The options above, resolved when the app is finalized.
    _throttle_plan: TaskPlan | None = None

    #: The worker reads a deferral's ETA on Redis' clock (hosts' clocks may differ).
    Request = "throttle.celery.request:ThrottleRequest"

    #: Why this task cannot be throttled in the app it is bound to (a shared
    #: task in an app without throttle settings): raised when it is sent.
    _throttle_unusable: str | None = None

    @classmethod
    def bind(cls, app: Celery) -> Any:
        bound = super().bind(app)
        cls._throttle_plan, cls._throttle_unusable = None, None
        if cls.throttle is None:
            if _app_wide(app):
                # Celery(task_cls=ThrottledTask): every task of the app,
                # Celery's built-ins too, is one of ours; those that name no
                # limit are not throttled.
                return bound
            raise ValueError(
                f"task {cls.name!r} has base=ThrottledTask but no throttle option: name a limit, "
                "e.g. @app.task(base=ThrottledTask, throttle='github')"
            )
        try:
            settings = settings_for(app)
        except ValueError as exc:
            if _configures_throttle(app):
                raise  # a worker with bad throttle settings fails at start, not at its first task
            # A shared task bound into an app that does not use throttle at
            # all (a second app in the process, a test app): the app must
            # still finalize; sending this task from it is refused.
            cls._throttle_unusable = (
                f"task {cls.name!r} is throttled (throttle={cls.throttle!r}) but app {app.main!r} "
                f"has no throttle settings: {exc}"
            )
            return bound
        # Resolve (and so check) the options when the app is finalized: a
        # worker with a bad limit fails at start, not at its first task.
        cls._throttle_plan = resolve_options(
            cls.name or cls.__name__, cls.throttle, cls.throttle_burst, cls.throttle_key, cls.throttle_cost, settings
        )
        return bound

    def _throttle_on(self) -> bool:
        """``throttle_enabled`` (default True): False runs throttled tasks as plain ones."""
        return settings_for(self.app).enabled

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        # Producers fail fast too: a cost or key the bucket would refuse is
        # refused before the message is sent.
        plan = self._throttle_plan
        if self._throttle_unusable is not None and not self.app.conf.task_always_eager:
            raise ValueError(self._throttle_unusable)
        if plan is not None and not self.app.conf.task_always_eager:
            call_args, call_kwargs = list(args or ()), dict(kwargs or {})
            plan.cost_for(call_args, call_kwargs)
            plan.bucket_names(call_args, call_kwargs)
        return super().apply_async(args, kwargs, **options)

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        """The gate: return to run the body, or re-send the task and ``Ignore`` this run."""
        request = self.request
        plan = self._throttle_plan
        if plan is None or request.is_eager or request.called_directly or not self._throttle_on():
            return
        call_args, call_kwargs = list(args or ()), dict(kwargs or {})
        if not plan.leases:
            _deciding(Gate(self, plan, call_args, call_kwargs).admit)
            return
        leases: list[Lease] = []
        if LeaseRider.fits(self, plan):
            # A new task of a rate and a concurrency limit: the lease is taken
            # in the rate decision's own call (one round trip), before the
            # buckets are touched.
            rider = LeaseRider(self, plan, call_args, call_kwargs)
            try:
                _deciding(Gate(self, plan, call_args, call_kwargs, rider=rider).admit)
            except LeaseRefused:
                # Queued for the next free lease (raises Deferred), unless one
                # was freed meanwhile (LeaseAgain): then decide again below.
                with contextlib.suppress(LeaseAgain):
                    _deciding(rider.park)
            except BaseException:
                rider.release()
                raise
            else:
                if rider.lease is not None:
                    hold(task_id, [rider.lease])
                    return
                # The gate admitted without booking (shadow limits only): the lease alone.
                _deciding(lambda: leases.extend(acquire_or_park(self, plan, call_args, call_kwargs)))
                hold(task_id, leases)
                return
        # Concurrency first: a task that parks for a lease has taken no
        # rate token; one deferred by the rate gives its leases back.
        _deciding(lambda: leases.extend(acquire_or_park(self, plan, call_args, call_kwargs)))
        try:
            if plan.limits:
                _deciding(Gate(self, plan, call_args, call_kwargs).admit)
        except BaseException:
            release_held(leases)
            raise
        hold(task_id, leases)  # renewed while the body runs, released by task_postrun

    def retry(self, args: Any = None, kwargs: Any = None, exc: Any = None, *rest: Any, **options: Any) -> Any:
        """Celery's ``retry``; a ``RateLimited`` ``exc`` pauses the fleet instead.

        ``autoretry_for=(Exception,)`` turns every exception of the body into
        ``self.retry(exc=...)``, RateLimited too: here it does what a raised
        RateLimited does (pause the limits fleet-wide, defer this task at no
        cost to its retry budget), so a 429 is never a plain retry.
        """
        request = self.request
        plan = self._throttle_plan
        direct = request.is_eager or request.called_directly
        if isinstance(exc, RateLimited) and plan is not None and not direct and self._throttle_on():
            call_args = list(request.args if args is None else args)
            call_kwargs = dict(request.kwargs if kwargs is None else kwargs)
            _deciding(Gate(self, plan, call_args, call_kwargs).rate_limited, exc)
        return super().retry(args, kwargs, exc, *rest, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.is_eager or self._throttle_plan is None or not self._throttle_on():
            return super().__call__(*args, **kwargs)
        # The worker's tracer already pushed this task's request; calling
        # self.run keeps it (Task.__call__ would push an empty one).
        try:
            return self.run(*args, **kwargs)
        except RateLimited as exc:
            _deciding(Gate(self, self._throttle_plan, list(args), dict(kwargs)).rate_limited, exc)
            raise  # only shadow limits: the error is the task's


def _app_wide(app: Celery) -> bool:
    """Whether ``app`` makes every task a ThrottledTask (``Celery(task_cls=ThrottledTask)``)."""
    return issubclass(app.Task, ThrottledTask)


def _configures_throttle(app: Celery) -> bool:
    """Whether ``app``'s config says anything about throttle (then its errors are the user's to see)."""
    return any(str(key).startswith("throttle_") for key in app.conf)


def _deciding(decide: Callable[..., None], *args: Any) -> None:
    """Run one of the gate's decisions; a deferral leaves without the gate's frames in its traceback.

    Celery turns the ``Ignore`` of every deferral into two picklable
    tracebacks (billiard's ``ExceptionInfo``: each frame's code positions,
    the formatted text), about 0.2 ms per frame on top of its own ~0.7 ms;
    a deferral is routine, not an error, and its traceback is never read.
    Measured with Celery's tracer: 0.94 -> 0.76 ms per deferral.
    """
    try:
        decide(*args)
    except Deferred as deferred:
        deferred.__traceback__ = None
        raise deferred from None


def _free_deferral(retval: Any = None, **_: Any) -> None:
    """Let a deferral's garbage go at once, not at the next full collection.

    Celery's tracer keeps the ``Ignore`` it caught (``TraceInfo.retval``)
    in a local of its own frame, and the exception's traceback points back
    at that frame: a reference cycle that only the cyclic collector frees,
    and only in its rare full collections, while each cycle holds the
    request, two picklable tracebacks and their code positions (~0.4 MB).
    Measured in a pool child parking tasks: RSS 50 -> 195 MB, then flat.
    Cutting the traceback here (the tracer is done with it: it sends this
    signal last) breaks the cycle, and reference counting frees the rest.
    """
    if isinstance(retval, Deferred):
        retval.__traceback__ = None


task_postrun.connect(_free_deferral, weak=False)
