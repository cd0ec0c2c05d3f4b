"""A fleet-wide semaphore: at most N holders at once, with leases that survive crashes.

A rate limit cannot say "at most 5 calls in flight": with slow, variable
calls, 10/s can mean 3 or 40 at once.  ``Semaphore(client, "partner-db", 10)``
can: each holder takes a *lease*, at most ``capacity`` leases are held at
once across every process on every host, and each lease expires on the
Redis server's clock unless renewed, so a holder that is SIGKILLed, frozen or
cut off frees its lease within ``expiry`` seconds and never holds it forever.

    sem = throttle.Semaphore(redis.Redis(), "partner-db", capacity=10, expiry=30)
    with sem.acquire(timeout=5):      # renewed every expiry/3 while the block runs
        call_the_partner()

One call (one round trip, ``lua/lease.lua``) acquires, renews or releases;
each call also removes leases that have expired, so no sweeper is needed.
``AsyncSemaphore`` is the same for ``redis.asyncio``.

``acquire(timeout=...)`` does not poll: the caller joins a queue in Redis
and blocks (BLPOP) on a list of its own; whoever frees a lease (a release,
or any call that finds a lease expired) hands it to the queue's first
waiter in the same script call and wakes it.  First come, first served.
A waiter that dies leaves the queue within ``_WAITER_STAY_S``; a lease handed
to it is taken back after ``HANDOVER_HOLD_S``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import RedisError

from . import _core as core
from .checks import check_prefix, check_seconds, seconds_to_us
from .errors import BackendUnavailable, LeaseUnavailable
from .keys import LIMIT_NAME, LeaseKeys
from .limit import US_PER_S
from .script import register

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "Semaphore",
    "AsyncSemaphore",
    "Lease",
    "AsyncLease",
    "LeaseReply",
    "Holder",
    "MAX_CAPACITY",
    "MAX_EXPIRY_S",
    "POLL_MAX_S",
    "HANDOVER_HOLD_S",
]

logger = logging.getLogger("throttle")

#: More holders than this is not a concurrency limit any API states.
MAX_CAPACITY = 1_000_000

#: A lease that is not renewed for a day is a leak, not a long call.
MAX_EXPIRY_S = 86_400.0

#: A waiter blocked in ``acquire`` looks again at least this often, in case
#: its wake-up was lost (the process that handed it the lease died first).
POLL_MAX_S = 1.0

#: A waiter that does not look again within this (it died) leaves the queue.
_WAITER_STAY_S = POLL_MAX_S + 1.0

#: A lease handed to a waiter is kept for it this long; a waiter takes it up
#: within POLL_MAX_S even when its wake-up is lost, so only a dead waiter's
#: lease waits this long before it goes to the next.
HANDOVER_HOLD_S = POLL_MAX_S + 2.0

#: How long a wake-up waits in Redis for its waiter (who takes it at once).
_WAKE_TTL_MS = 10_000

_T = TypeVar("_T")


class LeaseMode(IntEnum):
    """``lua/lease.lua``'s ARGV[1]."""

    STATUS = 0
    ACQUIRE = 1
    RENEW = 2
    RELEASE = 3
    WAIT = 4
    LEAVE = 5
    TAKE = 6
    RELEASE_PREFIX = 7


@dataclass(frozen=True)
class LeaseReply:
    """What one call of ``lua/lease.lua`` answered."""

    granted: bool
    held: int  #: leases held after the call
    wait: float  #: acquire refused: seconds until the earliest lease expires unless renewed
    server_time: float  #: Redis time of the call, seconds
    reclaimed: int  #: expired leases this call removed (holders that died or froze)
    queued: int = 0  #: waiters in the queue after the call
    #: (waiter, payload) this call handed a lease to: the caller wakes them.
    handed: tuple[tuple[str, bytes], ...] = ()
    #: take: the waiter is unknown (its lease was taken up by another copy of its message, or it never waited).
    unknown: bool = False
    #: What ``granted`` counted (release-prefix: how many leases it released).
    count: int = 0
    #: take: the waiter is overdue (its stay ended before a lease was handed to it); its entry is gone now.
    overdue: bool = False

    @classmethod
    def parse(cls, reply: Any) -> LeaseReply:
        granted, held, wait_us, now_us, reclaimed, queued = (int(x) for x in reply[:6])
        rest = reply[6:]
        handed = tuple((_text(rest[i]), _raw(rest[i + 1])) for i in range(0, len(rest), 2))
        return cls(
            granted >= 1,
            held,
            max(0, wait_us) / US_PER_S,
            now_us / US_PER_S,
            reclaimed,
            queued,
            handed,
            wait_us == -1,
            granted,
            wait_us == -2,
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@dataclass(frozen=True)
class Holder:
    """One held lease, for operators (``Semaphore.holders()``)."""

    lease_id: str
    description: str
    held_for: float  #: seconds since it was acquired
    expires_in: float  #: seconds until it expires unless renewed


def _check_name(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, got {type(value).__name__} {value!r}")
    if not LIMIT_NAME.match(value):
        raise ValueError(f"name must be letters, digits, '_', '.' or '-', got {value!r}")
    return value


def any_lease_name(value: object) -> str:
    """A lease name as the Celery side and the CLI use them: a limit's, or a
    limit's for one tenant (``api:tenant``, any text), checked when configured."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"lease name must be a non-empty str, got {value!r}")
    return value


def _check_capacity(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"capacity must be a whole number of leases, got {type(value).__name__} {value!r}")
    if not 1 <= value <= MAX_CAPACITY:
        raise ValueError(f"capacity must be from 1 to {MAX_CAPACITY}, got {value!r}")
    return value


def _check_expiry(value: object, name: str = "expiry") -> float:
    seconds = check_seconds(value, name, MAX_EXPIRY_S)
    if seconds < 0.01:
        raise ValueError(f"{name} must be at least 0.01 seconds (a lease must outlive a round trip), got {value!r}")
    return seconds


def _check_lease_id(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"lease_id must be a str, got {type(value).__name__} {value!r}")
    if not value or len(value) > 256:
        raise ValueError(f"lease_id must be 1 to 256 characters, got {value!r}")
    return value


def default_description() -> str:
    """Who holds a lease, for ``throttle inspect``: host, pid and thread."""
    return f"{socket.gethostname()} pid {os.getpid()} {threading.current_thread().name}"


class _SemaphoreCore:
    """Arguments and replies of ``lua/lease.lua`` for one semaphore (sync or asyncio)."""

    #: Checks ``name`` (a subclass naming tenants' semaphores allows more).
    _check_name = staticmethod(_check_name)

    def __init__(self, client: Any, name: str, capacity: int, expiry: float, prefix: str) -> None:
        self.name = self._check_name(name)
        self.capacity = _check_capacity(capacity)
        self.expiry = _check_expiry(expiry)
        self.prefix = check_prefix(prefix)
        self.keys = LeaseKeys(self.prefix, self.name)
        self._redis = client
        self._script = register(client, "lease")
        self._key_list = [self.keys.holders, self.keys.about, self.keys.queue, self.keys.waiters, self.keys.payloads]

    #: How long a lease handed over to a waiter is kept for it (see HANDOVER_HOLD_S).
    handover_hold = HANDOVER_HOLD_S

    def _args(
        self,
        mode: LeaseMode,
        lease_id: str = "",
        expiry: float | None = None,
        about: str = "",
        stay: float = 0.0,
        payload: bytes = b"",
        hand_over: bool = True,
    ) -> list[Any]:
        """``hand_over`` False: this call does not hand free leases to waiters (a look by
        an operator, who could not tell a parked task's message to go)."""
        expiry_us = seconds_to_us(self.expiry if expiry is None else expiry)
        hold_us = seconds_to_us(self.handover_hold) if hand_over else 0
        return [int(mode), lease_id, self.capacity, expiry_us, about, seconds_to_us(stay), payload, hold_us]

    def _wakes(self, reply: LeaseReply) -> Any:
        """A pipeline waking the waiters ``reply`` handed a lease to, or None (the common case: none)."""
        if not reply.handed:
            return None
        pipe = self._redis.pipeline(transaction=False)
        for waiter, _ in reply.handed:
            pipe.rpush(self.keys.wake(waiter), 1)
            pipe.pexpire(self.keys.wake(waiter), _WAKE_TTL_MS)
        return pipe

    def _unavailable(self, exc: RedisError) -> BaseException:
        return BackendUnavailable(self.keys.holders, exc) if core.unavailable(exc) else exc

    def _holders(self, now: float, scores: list[tuple[Any, float]], about: dict[Any, Any]) -> list[Holder]:
        out = []
        for raw_id, expires_us in scores:
            if expires_us / US_PER_S <= now:
                continue  # expired, not reclaimed yet (an operator's look reclaims nothing)
            lease_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            text = about.get(raw_id, b"")
            text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
            since, _, description = text.partition(" ")
            acquired = int(since) / US_PER_S if since.isdigit() else now
            out.append(Holder(lease_id, description, max(0.0, now - acquired), max(0.0, expires_us / US_PER_S - now)))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, capacity={self.capacity}, expiry={self.expiry:g})"


class Semaphore(_SemaphoreCore):
    """At most ``capacity`` holders of ``name`` at once, fleet-wide; leases expire after ``expiry`` s.

    ``prefix`` namespaces the keys like the buckets' (``throttle`` by default).
    """

    def __init__(
        self, client: redis.Redis | Any, name: str, capacity: int, expiry: float = 60.0, prefix: str = "throttle"
    ) -> None:
        super().__init__(client, name, capacity, expiry, prefix)

    def _call(
        self,
        mode: LeaseMode,
        lease_id: str = "",
        expiry: float | None = None,
        about: str = "",
        stay: float = 0.0,
        *,
        hand_over: bool = True,
    ) -> LeaseReply:
        """One script call; then wake the waiters it handed a lease to (one more round trip, only then)."""
        try:
            args = self._args(mode, lease_id, expiry, about, stay, hand_over=hand_over)
            reply = LeaseReply.parse(self._script(keys=self._key_list, args=args))
            wakes = self._wakes(reply)
            if wakes is not None:
                wakes.execute()
            return reply
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    def try_acquire(self, lease_id: str | None = None, description: str | None = None) -> Lease | None:
        """A lease now (one round trip), or None when ``capacity`` are held.

        ``lease_id``: a name for the lease (default: a random one).  An id
        already held is renewed and returned, not counted twice.
        """
        return self._attempt(lease_id, description)[0]

    def _attempt(self, lease_id: str | None, description: str | None = None) -> tuple[Lease | None, LeaseReply]:
        lease_id = uuid.uuid4().hex if lease_id is None else _check_lease_id(lease_id)
        reply = self._call(LeaseMode.ACQUIRE, lease_id, about=description or default_description())
        return (Lease(self, lease_id, reply.server_time) if reply.granted else None), reply

    def acquire(self, timeout: float | None = None, lease_id: str | None = None) -> Lease:
        """A lease, waiting in the queue up to ``timeout`` seconds (None: forever); else ``LeaseUnavailable``.

        Use it as a context manager: the lease is renewed while the block
        runs and released when it ends, however it ends.
        """
        limit = None if timeout is None else check_seconds(timeout, "timeout")
        deadline = None if limit is None else time.monotonic() + limit
        lease_id = uuid.uuid4().hex if lease_id is None else _check_lease_id(lease_id)
        about = default_description()
        while True:
            reply = self._call(LeaseMode.WAIT, lease_id, about=about, stay=_WAITER_STAY_S)
            if reply.granted:
                return Lease(self, lease_id, reply.server_time)
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                if self._call(LeaseMode.LEAVE, lease_id).granted:  # handed over at the last moment
                    return Lease(self, lease_id, reply.server_time)
                raise LeaseUnavailable(self.name, self.capacity, float(limit or 0.0))
            try:
                self._redis.blpop([self.keys.wake(lease_id)], timeout=min(left, POLL_MAX_S))
            except RedisError as exc:
                raise self._unavailable(exc) from exc

    def renew(self, lease_id: str, expiry: float | None = None) -> bool:
        """Push ``lease_id``'s expiry to ``expiry`` (default: the semaphore's) from now; False if it was lost."""
        checked = None if expiry is None else _check_expiry(expiry)
        return self._call(LeaseMode.RENEW, _check_lease_id(lease_id), checked).granted

    def release(self, lease_id: str) -> bool:
        """Give ``lease_id`` back; False if it was not held (released before, or expired)."""
        return self._call(LeaseMode.RELEASE, _check_lease_id(lease_id)).granted

    def held(self) -> int:
        """Leases held now (expired ones removed first)."""
        return self._call(LeaseMode.STATUS).held

    def holders(self) -> list[Holder]:
        """Who holds a lease now, longest-held first."""
        return self.look()[1]

    def look(self) -> tuple[LeaseReply, list[Holder]]:
        """How many are held and queued, and who holds them (longest-held first), changing nothing.

        A look reclaims nothing: expired leases are left out of the list, and
        reclaimed (and counted) by the holders' and waiters' own calls.
        """
        reply = self._call(LeaseMode.STATUS, hand_over=False)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrange(self.keys.holders, 0, -1, withscores=True)
            pipe.hgetall(self.keys.about)
            scores, about = pipe.execute()
        except RedisError as exc:
            raise self._unavailable(exc) from exc
        # The clock of their node (the STATUS reply's), not this host's.
        return reply, sorted(self._holders(reply.server_time, scores, about), key=lambda h: -h.held_for)


class Lease:
    """One held lease of a ``Semaphore``.

    As a context manager it is renewed every ``expiry / 3`` seconds by a
    daemon thread while the block runs (a call longer than the expiry keeps
    its lease) and released at the end.  If a renewal finds the lease gone
    (it expired: the process was frozen longer than the expiry), ``lost`` is
    set and a warning logged; the block is not interrupted.
    """

    def __init__(self, semaphore: Semaphore, lease_id: str, acquired_at: float) -> None:
        self.semaphore = semaphore
        self.id = lease_id
        self.acquired_at = acquired_at  #: Redis time, seconds
        self.lost = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def renew(self, expiry: float | None = None) -> bool:
        """Push the expiry out again; False (and ``lost``) if the lease had expired."""
        ok = self.semaphore.renew(self.id, expiry)
        if not ok:
            self.lost = True
        return ok

    def release(self) -> bool:
        """Give the lease back (idempotent); False if it was not held any more."""
        self._stop.set()
        return self.semaphore.release(self.id)

    def _renew_until_stopped(self) -> None:
        every = self.semaphore.expiry / 3
        while not self._stop.wait(every):
            try:
                if not self.renew():
                    logger.warning("lease %s of %r expired before it was renewed", self.id, self.semaphore.name)
                    return
            except BackendUnavailable as exc:
                logger.warning("could not renew lease %s of %r: %s", self.id, self.semaphore.name, exc)

    def __enter__(self) -> Lease:
        self._renewer = threading.Thread(target=self._renew_until_stopped, name=f"lease-{self.id}", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            self.release()
        except BackendUnavailable as err:
            # Never hide the block's own outcome: the lease frees at its expiry.
            logger.warning("could not release lease %s of %r (it expires by itself): %s",
                           self.id, self.semaphore.name, err)  # fmt: skip

    def __repr__(self) -> str:
        return f"Lease({self.semaphore.name!r}, {self.id!r}{', lost' if self.lost else ''})"


class AsyncSemaphore(_SemaphoreCore):
    """``Semaphore`` for ``redis.asyncio`` clients: every call is a coroutine."""

    def __init__(
        self,
        client: redis.asyncio.Redis | Any,
        name: str,
        capacity: int,
        expiry: float = 60.0,
        prefix: str = "throttle",
    ) -> None:
        super().__init__(client, name, capacity, expiry, prefix)

    async def _guard(self, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await call()
        except RedisError as exc:
            raise self._unavailable(exc) from exc

    async def _call(
        self,
        mode: LeaseMode,
        lease_id: str = "",
        expiry: float | None = None,
        about: str = "",
        stay: float = 0.0,
        *,
        hand_over: bool = True,
    ) -> LeaseReply:
        """See ``Semaphore._call``."""
        args = self._args(mode, lease_id, expiry, about, stay, hand_over=hand_over)
        reply = LeaseReply.parse(await self._guard(lambda: self._script(keys=self._key_list, args=args)))
        wakes = self._wakes(reply)
        if wakes is not None:
            await self._guard(wakes.execute)
        return reply

    async def try_acquire(self, lease_id: str | None = None, description: str | None = None) -> AsyncLease | None:
        """See ``Semaphore.try_acquire``."""
        return (await self._attempt(lease_id, description))[0]

    async def _attempt(
        self, lease_id: str | None, description: str | None = None
    ) -> tuple[AsyncLease | None, LeaseReply]:
        lease_id = uuid.uuid4().hex if lease_id is None else _check_lease_id(lease_id)
        reply = await self._call(LeaseMode.ACQUIRE, lease_id, about=description or default_description())
        return (AsyncLease(self, lease_id, reply.server_time) if reply.granted else None), reply

    async def acquire(self, timeout: float | None = None, lease_id: str | None = None) -> AsyncLease:
        """See ``Semaphore.acquire``; use with ``async with``."""
        limit = None if timeout is None else check_seconds(timeout, "timeout")
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        lease_id = uuid.uuid4().hex if lease_id is None else _check_lease_id(lease_id)
        about = default_description()
        while True:
            reply = await self._call(LeaseMode.WAIT, lease_id, about=about, stay=_WAITER_STAY_S)
            if reply.granted:
                return AsyncLease(self, lease_id, reply.server_time)
            left = math.inf if deadline is None else deadline - loop.time()
            if left <= 0:
                if (await self._call(LeaseMode.LEAVE, lease_id)).granted:
                    return AsyncLease(self, lease_id, reply.server_time)
                raise LeaseUnavailable(self.name, self.capacity, float(limit or 0.0))
            await self._guard(partial(self._redis.blpop, [self.keys.wake(lease_id)], timeout=min(left, POLL_MAX_S)))

    async def renew(self, lease_id: str, expiry: float | None = None) -> bool:
        """See ``Semaphore.renew``."""
        checked = None if expiry is None else _check_expiry(expiry)
        return (await self._call(LeaseMode.RENEW, _check_lease_id(lease_id), checked)).granted

    async def release(self, lease_id: str) -> bool:
        """See ``Semaphore.release``."""
        return (await self._call(LeaseMode.RELEASE, _check_lease_id(lease_id))).granted

    async def held(self) -> int:
        """See ``Semaphore.held``."""
        return (await self._call(LeaseMode.STATUS)).held

    async def holders(self) -> list[Holder]:
        """See ``Semaphore.holders``."""
        now = (await self._call(LeaseMode.STATUS, hand_over=False)).server_time
        client = self._redis

        async def read() -> Any:
            pipe = client.pipeline(transaction=False)
            pipe.zrange(self.keys.holders, 0, -1, withscores=True)
            pipe.hgetall(self.keys.about)
            return await pipe.execute()

        scores, about = await self._guard(read)
        return sorted(self._holders(now, scores, about), key=lambda h: -h.held_for)


class AsyncLease:
    """``Lease`` for ``AsyncSemaphore``: renewed by an asyncio task inside ``async with``."""

    def __init__(self, semaphore: AsyncSemaphore, lease_id: str, acquired_at: float) -> None:
        self.semaphore = semaphore
        self.id = lease_id
        self.acquired_at = acquired_at
        self.lost = False
        self._renewer: asyncio.Task[None] | None = None

    async def renew(self, expiry: float | None = None) -> bool:
        """See ``Lease.renew``."""
        ok = await self.semaphore.renew(self.id, expiry)
        if not ok:
            self.lost = True
        return ok

    async def release(self) -> bool:
        """See ``Lease.release``."""
        self._cancel_renewer()
        return await self.semaphore.release(self.id)

    async def _renew_forever(self) -> None:
        every = self.semaphore.expiry / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.renew():
                    logger.warning("lease %s of %r expired before it was renewed", self.id, self.semaphore.name)
                    return
            except BackendUnavailable as exc:
                logger.warning("could not renew lease %s of %r: %s", self.id, self.semaphore.name, exc)

    def _cancel_renewer(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            self._renewer = None

    async def __aenter__(self) -> AsyncLease:
        self._renewer = asyncio.ensure_future(self._renew_forever())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.release()
        except BackendUnavailable as err:
            logger.warning("could not release lease %s of %r (it expires by itself): %s",
                           self.id, self.semaphore.name, err)  # fmt: skip

    def __repr__(self) -> str:
        return f"AsyncLease({self.semaphore.name!r}, {self.id!r}{', lost' if self.lost else ''})"
