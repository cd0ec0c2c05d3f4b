"""Concurrency limits in Celery: a lease per running body, parked tasks handed the next free lease.

``throttle_limits = {"partner": {"concurrency": 5}}``: at most 5 bodies of
the tasks naming ``partner`` run at once, fleet-wide.  The gate takes a
lease (``throttle.semaphore``, lease id ``<task id>.<random>``) before the
body, the worker process renews it every third of its expiry while the body
runs, and gives it back when the body ends, however it ends (``task_postrun``
in the process that ran it; a hard time limit, a killed process or a revoke
with terminate: the worker's main process, ``release_task``).

A task that finds every lease held does not wait in a pool slot: it *parks*
in the limit's queue in Redis, its message (the task, packed like a waiting
room's) as the queued waiter's payload, and ends this run with ``Ignore``
(no retry spent).  Whoever frees a lease (a release, a renewal or the sweeper
finding one expired) hands it to the first parked task in the same script
call and publishes that task's message, with the lease's id in
``HEADER_LEASE``; the task arrives and takes the lease up.  No polling: a
freed lease goes to the next task in one broker hop.

Nothing is lost on the way: the payload stays in Redis until the lease is
taken up.  A hand-over whose message is lost (the publisher died) or late
expires after ``HANDOVER_HOLD_S``; the task goes back to the head of the
queue and is handed over and published again.  Of two copies of one
hand-over, the first to arrive takes the lease; the other finds the payload
gone and is dropped, unless the broker says it is a redelivery (a worker
died running it with ``acks_late``): that one runs again, under a new lease.
A task still parked when its ``throttle_max_defer`` is spent is published
*overdue* (no lease; the same durability) and fails with
``ThrottleDeferralExpired``, as a rate-limited task whose slot is too far
does: it never vanishes from the queue.

Leases that nobody releases (a SIGKILLed worker) expire on Redis' clock; the
sweeper in every worker's main process looks at the limits with parked tasks
every ``SWEEP_S`` so that their queues move even when no task of the limit
runs anywhere.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery
from celery.exceptions import Ignore
from celery.signals import task_postrun
from redis.exceptions import RedisError

from ..errors import BackendUnavailable, ThrottleDeferralExpired
from ..keys import limit_of, own_key
from ..limit import ConcurrencyLimit
from ..semaphore import Lease, LeaseMode, LeaseReply, Semaphore, any_lease_name, default_description
from . import signals
from .deferral import (
    _PUBLISH_RETRY,
    HEADER_LEASE,
    DeferralReason,
    Deferred,
    Stamp,
    backend_backoff,
    budget_left,
    header,
    outgoing,
    resend,
    store_deferred,
)
from .parking import pack, unpack
from .runtime import Runtime, runtime_for

if TYPE_CHECKING:
    from celery import Task

    from ..bucket import MultiBucket, TokenBucket
    from ..decision import Decision
    from .options import TaskPlan

__all__ = [
    "TaskSemaphore",
    "acquire_leases",
    "hold",
    "release_held",
    "release_task",
    "LeaseSweeper",
    "LeaseRider",
    "LeaseRefused",
    "LeaseAgain",
    "leases_index",
    "HANDOVER_HOLD_S",
    "SWEEP_S",
    "TIME_LIMIT_MARGIN_S",
]

logger = logging.getLogger("throttle")

#: A lease handed over to a parked task is kept for it this long: the
#: task's message goes through the broker (behind whatever is queued before
#: it) to a worker.  Later than that, the lease goes to the head of the queue
#: and the task's message is published again.
HANDOVER_HOLD_S = 15.0

#: How often each worker's sweeper looks at the limits with parked tasks.
SWEEP_S = 1.0

#: A task with a hard time limit holds its lease at most this much longer
#: than that limit without renewing it.
TIME_LIMIT_MARGIN_S = 5.0


def leases_index(prefix: str) -> str:
    """zset: the lease names with parked tasks -> when a task last parked there (Redis s)."""
    return own_key(prefix, "{leases}")


class TaskSemaphore(Semaphore):
    """A concurrency limit's semaphore on the Celery side: a hand-over publishes the parked task."""

    _check_name = staticmethod(any_lease_name)
    handover_hold = HANDOVER_HOLD_S

    def __init__(self, app: Celery, runtime: Runtime, name: str, capacity: int, expiry: float) -> None:
        super().__init__(runtime.redis, name, capacity, expiry, runtime.settings.prefix)
        self.app = app
        self.runtime = runtime
        self.limit = limit_of(name)

    def call(
        self,
        mode: LeaseMode,
        lease_id: str = "",
        expiry: float | None = None,
        about: str = "",
        stay: float = 0.0,
        payload: bytes = b"",
        *,
        hand_over: bool = True,
    ) -> LeaseReply:
        """One script call; then publish the parked tasks it handed a lease to."""
        try:
            args = self._args(mode, lease_id, expiry, about, stay, payload, hand_over)
            reply = LeaseReply.parse(self._script(keys=self._key_list, args=args))
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        return self.after(reply)

    def after(self, reply: LeaseReply) -> LeaseReply:
        """What follows any call: count expired leases, publish the tasks handed one."""
        if reply.reclaimed and self.runtime.metrics is not None:
            self.runtime.metrics.count([self.limit], "lease_expiries", reply.reclaimed)
        if reply.handed:
            self._hand_over(reply.handed)
        return reply

    #: The base class's calls (acquire, release, ...) publish what they hand over too.
    _call = call

    def _hand_over(self, handed: Sequence[tuple[str, bytes]]) -> None:
        """Publish each parked task that was handed a lease (a failure: the hold expires, it comes back)."""
        wakes = [waiter for waiter, payload in handed if not payload]
        for waiter, payload in handed:
            if payload:
                self._publish(waiter, payload)
        if wakes:  # a blocking Semaphore.acquire() on the same name (non-Celery code)
            try:
                pipe = self._redis.pipeline(transaction=False)
                for waiter in wakes:
                    pipe.rpush(self.keys.wake(waiter), 1)
                    pipe.pexpire(self.keys.wake(waiter), 10_000)
                pipe.execute()
            except RedisError as exc:
                logger.debug("could not wake a waiter of %r: %s", self.name, exc)

    def _publish(self, lease_id: str, payload: bytes) -> None:
        try:
            signature = unpack(self.app, payload)
        except (ValueError, TypeError) as exc:
            # Not ours, or from a newer throttle: it could never take its
            # lease up, so it must not hold one (handed over again every
            # HANDOVER_HOLD_S, it would block the queue's head forever).
            # The lease goes to the next task; the entry stays in Redis
            # for an operator until its stay ends, and is dropped when it
            # comes back then (overdue: no lease to give back).
            logger.error("throttle: cannot publish parked %s of %r (its lease goes to the next): %s",
                         lease_id, self.name, exc)  # fmt: skip
            if not self.call(LeaseMode.RELEASE, lease_id).granted:
                logger.error("throttle: dropped parked %s of %r: its stay ended and it cannot be published",
                             lease_id, self.name)  # fmt: skip
                self.call(LeaseMode.LEAVE, lease_id)
            return
        headers = dict(signature.options.get("headers") or {})
        stamped = headers.get(HEADER_LEASE)
        retries = stamped[2] if isinstance(stamped, list) and len(stamped) == 3 else 0
        headers[HEADER_LEASE] = [self.name, lease_id, retries]
        try:
            signature.apply_async(headers=headers, retry=True, retry_policy=_PUBLISH_RETRY)
        except Exception as exc:  # the broker: the hand-over expires and is made again
            logger.warning("throttle: could not publish parked %s of %r (handed over again later): %s",
                           lease_id, self.name, exc)  # fmt: skip
            return
        if self.runtime.metrics is not None:
            self.runtime.metrics.count([self.limit], "handed_over")


# Which semaphore a limit uses in this process ---------------------------------

_semaphores: dict[tuple[int, int, str, int, float], TaskSemaphore] = {}
_semaphores_lock = threading.Lock()


def semaphore_for(
    app: Celery, runtime: Runtime, limit: ConcurrencyLimit, tenant: str | None, expiry: float | None = None
) -> TaskSemaphore:
    """``limit``'s semaphore (``tenant``'s, if split per key) at the capacity in force now."""
    name = limit.lease_name(tenant)
    capacity = capacity_in_force(runtime, limit)
    lease_expiry = limit.expiry if expiry is None else expiry
    key = (id(app), id(runtime), name, capacity, lease_expiry)
    found = _semaphores.get(key)
    if found is None:
        with _semaphores_lock:
            if len(_semaphores) > 10_000:
                _semaphores.clear()
            found = _semaphores.setdefault(key, TaskSemaphore(app, runtime, name, capacity, lease_expiry))
    return found


def capacity_in_force(runtime: Runtime, limit: ConcurrencyLimit) -> int:
    """The configured capacity, or an operator's (``throttle set NAME --concurrency N``)."""
    try:
        state = runtime.state()
    except BackendUnavailable:
        return limit.capacity
    return state.in_force(limit.name, None).concurrency or limit.capacity


def _expiry(task: Task, limit: ConcurrencyLimit) -> float:
    """The limit's lease expiry, at most the task's hard time limit + a margin (a body dies by then)."""
    hard = None
    timelimit = getattr(task.request, "timelimit", None)
    if isinstance(timelimit, (list, tuple)) and timelimit and timelimit[0]:
        hard = timelimit[0]
    hard = hard or task.time_limit or task.app.conf.task_time_limit
    if isinstance(hard, (int, float)) and hard > 0:
        return min(limit.expiry, float(hard) + TIME_LIMIT_MARGIN_S)
    return limit.expiry


# The gate's side -------------------------------------------------------------


def acquire_leases(task: Task, plan: TaskPlan, args: list[Any], kwargs: dict[str, Any], budget: float) -> list[Lease]:
    """A lease of each of the task's concurrency limits, or park it (raises ``Deferred``/``Ignore``).

    All or nothing: a task refused by one limit gives back the leases it
    took of the others before it parks.  ``budget``: how long it may wait.
    """
    runtime = runtime_for(task.app)
    request = task.request
    tenant = plan.tenant(args, kwargs)
    about = f"{task.name}[{request.id}] {default_description()}"
    handed = _handed(request)
    held: list[Lease] = []
    # The lease handed over to this copy first: taking it up removes the
    # task's entry from that limit's queue, so parking at another limit
    # afterwards can never leave a second copy to be published from there.
    order = sorted(plan.leases, key=lambda limit: handed is None or limit.lease_name(tenant) != handed[0])
    try:
        for limit in order:
            sem = semaphore_for(task.app, runtime, limit, tenant, _expiry(task, limit))
            if handed is not None and handed[0] == sem.name:
                reply = sem.call(LeaseMode.TAKE, handed[1], about=about)
                if reply.granted:
                    held.append(Lease(sem, handed[1], reply.server_time))
                    continue
                _not_taken(task, sem, reply, runtime)  # drops this copy, unless it is a redelivery
            lease_id = f"{request.id}.{uuid.uuid4().hex[:12]}"
            reply = sem.call(LeaseMode.ACQUIRE, lease_id, about=about)
            if reply.granted:
                held.append(Lease(sem, lease_id, reply.server_time))
                continue
            # Every lease is held: give back the others' (all or nothing), park here.
            release_held(held)
            held = []
            _park(task, sem, runtime, lease_id, args, kwargs, budget, about)
    except BaseException:
        release_held(held)
        raise
    return held


def _handed(request: Any) -> tuple[str, str] | None:
    """(lease name, lease id) handed over to this delivery; None if none, or if the header is not this run's."""
    value = header(request, HEADER_LEASE)
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    name, lease_id, retries = value
    try:
        if int(retries) != int(request.retries or 0):
            return None  # copied into a Celery retry: the retry starts afresh
    except (TypeError, ValueError):
        return None
    return (str(name), str(lease_id))


def _not_taken(task: Task, sem: TaskSemaphore, reply: LeaseReply, runtime: Runtime) -> None:
    """A hand-over copy that could not take its lease: drop it, or (a redelivery) let it park afresh."""
    request = task.request
    if reply.overdue:
        # Its stay in the queue ended (lease.lua handed its message back
        # without a lease): it fails where its errors are seen, never vanishes.
        raise ThrottleDeferralExpired(
            f"{task.name}[{request.id}]: waited for a lease of {sem.name!r} longer than "
            f"throttle_max_defer={runtime.settings.max_defer:g}s"
        )
    if not reply.unknown:
        # Its hand-over expired before it arrived: it is back in the queue,
        # and its message will be published again with the next free lease.
        logger.info("%s[%s] came late for its lease of %r: it waits in the queue", task.name, request.id, sem.name)
        raise Ignore()
    delivery = getattr(request, "delivery_info", None) or {}
    if delivery.get("redelivered"):
        logger.warning("%s[%s] redelivered after its lease of %r was taken up: running it again",
                       task.name, request.id, sem.name)  # fmt: skip
        return
    logger.warning("%s[%s] dropped: a second copy of a task handed a lease of %r", task.name, request.id, sem.name)
    if runtime.metrics is not None:
        runtime.metrics.count([sem.limit], "duplicates")
    raise Ignore()


def _park(
    task: Task, sem: TaskSemaphore, runtime: Runtime, lease_id: str, args: list[Any], kwargs: dict[str, Any],
    budget: float, about: str,
) -> None:  # fmt: skip
    """Queue the task for ``sem``'s next free lease, its message as the payload; end this run."""
    request = task.request
    stamp = Stamp.read(request)
    signature = outgoing(task, args, kwargs, stamp, 0.0, None)
    signature.options["headers"][HEADER_LEASE] = [sem.name, lease_id, int(request.retries or 0)]
    payload = pack(task, signature)
    reply = sem.call(LeaseMode.WAIT, lease_id, about=about, stay=budget, payload=payload)
    if reply.granted:
        # A lease was freed between the two calls: give it back, decide again
        # (the task may hold other limits' leases to take first).
        sem.call(LeaseMode.RELEASE, lease_id)
        raise LeaseAgain(request.id)
    try:
        runtime.redis.zadd(leases_index(runtime.settings.prefix), {sem.name: reply.server_time})
    except RedisError as exc:  # the next release of the limit hands it over all the same
        logger.warning("could not index the queue of %r: %s", sem.name, exc)
    deferred = Deferred(reply.wait, DeferralReason.CONCURRENCY.value, stamp.deferrals + 1, True)
    logger.info("%s[%s] parked for a lease of %r (%d held, %d queued)",
                task.name, request.id, sem.name, reply.held, reply.queued)  # fmt: skip
    if runtime.metrics is not None:
        runtime.metrics.count([sem.limit], "deferred:concurrency")
        runtime.metrics.count([sem.limit], "parked")
    signals.task_deferred.send(
        sender=task, task_id=request.id, limits=[sem.name], wait=reply.wait,
        reason=DeferralReason.CONCURRENCY.value, deferrals=stamp.deferrals + 1, parked=True,
    )  # fmt: skip
    store_deferred(task, deferred)
    raise deferred


class LeaseAgain(Exception):
    """A lease turned up between the refusal and the park: decide once more."""


def acquire_or_park(task: Task, plan: TaskPlan, args: list[Any], kwargs: dict[str, Any]) -> list[Lease]:
    """``acquire_leases``, deciding again (a few times) when a lease turned up while parking."""
    budget = _budget_left(task)
    for attempt in range(4):
        try:
            leases = acquire_leases(task, plan, args, kwargs, budget)
            break
        except LeaseAgain:
            if attempt == 3:
                # Leases keep coming and going between our two calls: send
                # the task again to decide in a moment (never lost).
                stamp = Stamp.read(task.request)
                resend(task, args, kwargs, stamp, 0.05, 0.05, None)
                raise Deferred(0.05, DeferralReason.CONCURRENCY.value, stamp.deferrals + 1, False) from None
        except BackendUnavailable as exc:
            return _backend_error(task, args, kwargs, exc)
    metrics = runtime_for(task.app).metrics
    if metrics is not None and not plan.limits:  # with a rate, the rate gate counts the admission
        metrics.count([limit.name for limit in plan.leases], "admitted:now")
    return leases


def _backend_error(task: Task, args: list[Any], kwargs: dict[str, Any], exc: BackendUnavailable) -> list[Lease]:
    """Redis cannot answer for a lease: ``throttle_on_backend_error`` decides, as for a rate."""
    runtime = runtime_for(task.app)
    policy = runtime.settings.on_backend_error
    request = task.request
    names = [limit.name for limit in task._throttle_plan.leases]
    if runtime.metrics is not None:
        runtime.metrics.count(names, f"backend_errors:{policy}")
    signals.backend_error.send(sender=task, task_id=request.id, limits=names, error=exc, policy=policy)
    if policy == "allow":
        logger.warning("%s[%s] runs without its concurrency lease: %s", task.name, request.id, exc)
        return []
    if policy == "fail":
        logger.error("%s[%s] fails: %s", task.name, request.id, exc)
        raise exc
    stamp = Stamp.read(request)
    wait = backend_backoff(stamp.deferrals)
    resend(task, args, kwargs, stamp, wait, wait, None)
    logger.info("%s[%s] deferred %.1fs: %s", task.name, request.id, wait, exc)
    raise Deferred(wait, DeferralReason.BACKEND.value, stamp.deferrals + 1, False)


def _budget_left(task: Task) -> float:
    """Seconds this task may still wait (``throttle_max_defer`` since its first deferral)."""
    # At least 1 s: a task whose budget is spent parks for a second, then is
    # published overdue and fails (ThrottleDeferralExpired), like any other.
    return max(1.0, budget_left(runtime_for(task.app).settings.max_defer, Stamp.read(task.request).since))


# One round trip: the lease in the rate decision's call --------------------------


class LeaseRefused(Exception):
    """The lease was refused in the rate decision's call; the buckets were not touched."""


class LeaseRider:
    """A new task's lease of its one concurrency limit, taken in the same script call as
    its rate decision (``lua/leased.lua``): one round trip when both say yes."""

    def __init__(self, task: Task, plan: TaskPlan, args: list[Any], kwargs: dict[str, Any]) -> None:
        runtime = runtime_for(task.app)
        limit = plan.leases[0]
        self.task, self.plan, self.args, self.kwargs = task, plan, args, kwargs
        self.sem = semaphore_for(task.app, runtime, limit, plan.tenant(args, kwargs), _expiry(task, limit))
        self.lease_id = f"{task.request.id}.{uuid.uuid4().hex[:12]}"
        self.about = f"{task.name}[{task.request.id}] {default_description()}"
        self.lease: Lease | None = None
        self.pending = True  # not asked yet (the gate may decide without a booking: shadow limits only)

    @classmethod
    def fits(cls, task: Task, plan: TaskPlan) -> bool:
        """A new delivery of a task with a rate and exactly one concurrency limit (the common case)."""
        request = task.request
        return (
            bool(plan.limits) and len(plan.leases) == 1 and _handed(request) is None and not Stamp.read(request).booked
        )

    def book(self, buckets: TokenBucket | MultiBucket, cost: int, max_wait: float) -> Decision:
        """The lease, then ``buckets.book``: in one call when they share a node and slot."""
        self.pending = False
        sem = self.sem
        args = sem._args(LeaseMode.ACQUIRE, self.lease_id, about=self.about)
        if buckets.can_lease_with(sem.keys.holders):
            try:
                decision, raw = buckets.book_leased(cost, max_wait, sem._key_list, args)
            except RedisError as exc:  # not BackendUnavailable: a bug, as in any script call
                raise sem._unavailable(exc) from exc
            reply = sem.after(LeaseReply.parse(raw))
        else:
            reply = sem.call(LeaseMode.ACQUIRE, self.lease_id, about=self.about)
            decision = None
        if not reply.granted:
            raise LeaseRefused(sem.name)
        self.lease = Lease(sem, self.lease_id, reply.server_time)
        return decision if decision is not None else buckets.book(cost, max_wait)

    def park(self) -> None:
        """Refused: park for the next free lease (raises ``Deferred``, or ``LeaseAgain``)."""
        runtime = runtime_for(self.task.app)
        try:
            _park(self.task, self.sem, runtime, self.lease_id, self.args, self.kwargs, _budget_left(self.task),
                  self.about)  # fmt: skip
        except BackendUnavailable as exc:
            if not _backend_error(self.task, self.args, self.kwargs, exc):  # "allow": run without the lease
                return

    def release(self) -> None:
        if self.lease is not None:
            release_held([self.lease])
            self.lease = None


# Held leases: renewed while the body runs, released when it ends ---------------


class Renewer:
    """One thread per process renews every lease its bodies hold, each every third of its expiry.

    A thread per lease would cost a thread start and join per task (~1 ms
    measured on the solo pool); one thread looking every ``_RENEW_TICK_S``
    costs nothing per task.  Started on first use in each process (after
    the fork, for prefork children).
    """

    def __init__(self) -> None:
        self._leases: dict[tuple[str, int], tuple[list[Lease], list[float]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, key: tuple[str, int], leases: list[Lease]) -> None:
        now = time.monotonic()
        with self._lock:
            self._leases[key] = (leases, [now] * len(leases))
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="throttle-lease-renewer", daemon=True)
                self._thread.start()

    def pop(self, key: tuple[str, int]) -> list[Lease] | None:
        with self._lock:
            found = self._leases.pop(key, None)
        return found[0] if found is not None else None

    def _run(self) -> None:
        wake = threading.Event()  # never set: Event.wait works where time.sleep may not (libfaketime)
        while True:
            wake.wait(_RENEW_TICK_S)
            with self._lock:
                held = list(self._leases.values())
            now = time.monotonic()
            for leases, renewed in held:
                for i, lease in enumerate(leases):
                    if now - renewed[i] < lease.semaphore.expiry / 3 or lease.lost:
                        continue
                    try:
                        if lease.renew():
                            renewed[i] = now
                        else:
                            logger.warning("lease %s of %r expired before it was renewed (a frozen process?)",
                                           lease.id, lease.semaphore.name)  # fmt: skip
                    except Exception as exc:  # Redis down: try again at the next tick; the lease may expire
                        logger.warning("could not renew lease %s of %r: %s", lease.id, lease.semaphore.name, exc)


#: How often the renewer looks (a lease is renewed at the first look after a third of its expiry).
_RENEW_TICK_S = 0.25

_renewer = Renewer()


def hold(task_id: str, leases: list[Lease]) -> None:
    """Keep ``leases`` renewed until this thread's body of ``task_id`` ends (``task_postrun``)."""
    if leases:
        _renewer.hold((task_id, threading.get_ident()), leases)


def release_held(leases: Sequence[Lease]) -> None:
    """Give ``leases`` back; one that cannot be (Redis down) expires by itself."""
    for lease in leases:
        try:
            lease.release()
        except Exception as exc:  # never let a release hide the task's outcome
            logger.warning("could not release lease %s of %r (it expires by itself): %s",
                           lease.id, lease.semaphore.name, exc)  # fmt: skip


def _on_postrun(task_id: str | None = None, **_: Any) -> None:
    if task_id is None:
        return
    leases = _renewer.pop((task_id, threading.get_ident()))
    if leases:
        release_held(leases)


task_postrun.connect(_on_postrun, weak=False)


def release_task(app: Celery, task: Task, task_id: str, args: Any, kwargs: Any) -> int:
    """Release every lease of ``task_id`` from the worker's main process (its pool process died).

    A hard time limit, a revoke with terminate or a killed pool process:
    ``task_postrun`` never ran.  Returns how many leases were released.
    """
    plan = getattr(task, "_throttle_plan", None)
    if plan is None or not plan.leases:
        return 0
    runtime = runtime_for(app)
    try:
        tenant = plan.tenant(list(args or ()), dict(kwargs or {}))
    except Exception:  # the key function fails here too: the leases expire by themselves
        tenant = None
    released = 0
    for limit in plan.leases:
        try:
            sem = semaphore_for(app, runtime, limit, tenant)
            released += sem.call(LeaseMode.RELEASE_PREFIX, task_id + ".").count
        except (RedisError, BackendUnavailable) as exc:
            logger.warning("could not release the leases of %s (they expire by themselves): %s", task_id, exc)
    if released:
        logger.info("released %d lease(s) of %s[%s] whose process died", released, task.name, task_id)
    return released


# The sweeper ---------------------------------------------------------------


class LeaseSweeper:
    """Keeps parked tasks moving when no running task would: every ``SWEEP_S``,
    each limit with parked tasks is looked at (expired leases reclaimed,
    free ones handed over and their tasks published)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.runtime = runtime_for(app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="throttle-leases", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(SWEEP_S):
            try:
                self.sweep()
            except (RedisError, BackendUnavailable, OSError) as exc:
                logger.warning("throttle lease sweeper: %s (retrying)", exc)
            except Exception:  # never let the thread die: parked tasks depend on it
                logger.exception("throttle lease sweeper failed; retrying")

    def sweep(self) -> int:
        """One look at every indexed queue of this app's limits; how many were looked at."""
        index = leases_index(self.runtime.settings.prefix)
        limits = self.runtime.settings.concurrency
        looked = 0
        entries: Any = self.runtime.redis.zrange(index, 0, -1, withscores=True)
        for raw, parked_at in entries:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            limit = limits.get(limit_of(name))
            if limit is None:
                continue  # another app's limit
            tenant = name.partition(":")[2] or None
            sem = semaphore_for(self.app, self.runtime, limit, tenant)
            reply = sem.call(LeaseMode.STATUS)
            looked += 1
            idle = reply.held == 0 and reply.queued == 0 and parked_at < reply.server_time - 60
            # (An overdue task, out of the queue until its copy arrives, keeps the limit here.)
            if idle and not self.runtime.redis.exists(sem.keys.payloads):
                self.runtime.redis.zrem(index, name)
        return looked


_sweepers: dict[int, LeaseSweeper] = {}


def start_sweeper(app: Celery) -> None:
    if id(app) in _sweepers or not runtime_for(app).settings.concurrency:
        return
    sweeper = LeaseSweeper(app)
    sweeper.start()
    _sweepers[id(app)] = sweeper


def stop_sweeper(app: Celery) -> None:
    sweeper = _sweepers.pop(id(app), None)
    if sweeper is not None:
        sweeper.stop()
