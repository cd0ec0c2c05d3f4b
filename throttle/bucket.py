"""The shared token bucket: one Redis round trip per decision.

``TokenBucket`` decides one bucket; ``MultiBucket`` decides several at once,
all-or-nothing ("10/s AND 5000/h AND this tenant's 1/s").  Both run
``lua/gcra.lua`` with EVALSHA; the script reads the Redis server's clock, so
every host in the fleet is judged by one clock whatever its own says.

``RedisTokenBucket`` is the original API (``consume() -> bool``) on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import redis
import redis.exceptions

from . import _core as core
from . import slots, tickets
from ._core import BucketRef, BucketsBase, SingleBucket
from .decision import Decision
from .errors import BackendUnavailable, ReservationRefused
from .gcra import Mode
from .limit import Limit
from .script import REPLY_LEN, register
from .transaction import run_transaction

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

    SyncRedis = redis.Redis | RedisCluster

__all__ = ["Decision", "TokenBucket", "MultiBucket", "RedisTokenBucket"]

Strategy = Literal["script", "transaction"]
STRATEGIES: tuple[Strategy, ...] = ("script", "transaction")
_T = TypeVar("_T")


class SyncBuckets(BucketsBase):
    """consume / peek / book / reserve / pause / reset against a sync redis client."""

    def __init__(self, client: SyncRedis, buckets: Sequence[BucketRef], strategy: Strategy = "script") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'script' or 'transaction', got {strategy!r}")
        super().__init__(client, buckets, "redis-py")
        if strategy == "transaction" and not isinstance(client, redis.Redis):
            raise TypeError(f"strategy='transaction' needs a redis.Redis client, got {type(client).__name__}")
        self.strategy: Strategy = strategy
        self._leased: Any = None  # lua/leased.lua, registered on first use
        # On Redis Cluster, buckets in different slots cannot share a script
        # call: each slot's buckets are decided in turn (see slots.split_steps).
        self._parts = [SyncBuckets(client, g, strategy) for g in self.groups] if len(self.groups) > 1 else []
        if strategy == "script" and not self._parts:
            self.batch_slot = slots.slot_of(self.plan.keys[0]) if slots.is_cluster(client) else 0

    @property
    def redis(self) -> SyncRedis:
        return cast("SyncRedis", self._redis)

    def _guard(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except redis.exceptions.RedisError as exc:
            if core.unavailable(exc):
                raise BackendUnavailable(self.plan.label, exc) from exc
            raise

    def _eval(self, keys: list[str | bytes], args: list[int]) -> Any:
        # EVALSHA straight away; the registered Script reloads the source
        # when the server has lost it (SCRIPT FLUSH, restart, failover).
        try:
            return self._redis.evalsha(self.script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self.script(keys=keys, args=args)

    def _run(self, mode: Mode, cost: int, limit_us: int = 0) -> Decision:
        plan = self.plan
        if self._parts:
            split = slots.Split(len(self._parts), mode, cost, limit_us)
            while not split.answer(self._parts[split.index]._run(*split.call)):
                pass
            return cast(Decision, split.result)
        if self.strategy == "transaction" and mode is not Mode.RESET:
            client = cast(redis.Redis, self._redis)  # checked in __init__
            outcome = self._guard(
                lambda: run_transaction(client, plan.keys, plan.limits, cost, mode, limit_us, plan.pause_keys)
            )
            return plan.decision(outcome.reply())
        args = plan.args(mode, cost, limit_us)
        return plan.decision(self._guard(lambda: self._eval(plan.keys_for(mode), args)))

    def consume(self, cost: int = 1) -> Decision:
        """Take ``cost`` tokens now if every bucket has them; otherwise take none."""
        return self._run(Mode.CONSUME, self.plan.cost(cost))

    def can_lease_with(self, lease_key: str) -> bool:
        """Whether ``book_leased`` can decide these buckets with the lease keyed ``lease_key``:
        one script call (the script strategy, one cluster slot, the lease's)."""
        if self.strategy != "script" or self._parts:
            return False
        return not slots.is_cluster(self._redis) or slots.slot_of(lease_key) == slots.slot_of(self.plan.keys[0])

    def book_leased(
        self, cost: int, max_wait: float, lease_keys: Sequence[str], lease_args: Sequence[Any]
    ) -> tuple[Decision | None, Any]:
        """A concurrency lease (``lua/lease.lua``, mode acquire) and ``book``, in one call.

        Returns (the booking, or None when the lease was refused and the
        buckets were not touched; lease.lua's raw reply).  Only where
        ``can_lease_with`` says so.
        """
        mode, checked, limit_us = self.plan.book(cost, max_wait)
        keys = [*lease_keys, *self.plan.keys_for(mode)]
        args = [*lease_args, *self.plan.args(mode, checked, limit_us)]
        if self._leased is None:
            self._leased = register(self._redis, "leased")
        script = self._leased
        reply = self._guard(lambda: script(keys=keys, args=args))
        lease = reply[REPLY_LEN:]
        if int(lease[0]) != 1:
            return None, lease
        return self.plan.decision(reply[:REPLY_LEN]), lease

    def peek(self, cost: int = 1) -> Decision:
        """What ``consume(cost)`` would say now, without taking anything."""
        return self._run(Mode.PEEK, self.plan.cost(cost))

    def book(self, cost: int = 1, max_wait: float = core.DEFAULT_MAX_WAIT) -> Decision:
        """Book the next free slot for ``cost`` tokens, at most ``max_wait`` s ahead.

        Granted: the tokens are taken now (the bucket goes into debt) and
        ``retry_after`` is the wait until the slot; ``server_time +
        retry_after`` is the slot on Redis' clock.  Refused (``allowed`` is
        False): nothing was booked and ``retry_after`` says how far the next
        slot is.
        """
        return self._run(*self.plan.book(cost, max_wait))

    def reserve(self, cost: int = 1, max_wait: float = core.DEFAULT_MAX_WAIT) -> float:
        """Book the next free slot and return the seconds to wait for it.

        Waiters are served in booking order, each at its own slot, instead of
        all retrying at once.  Raises ``ReservationRefused`` when the slot is
        further than ``max_wait`` seconds away (nothing is booked then).
        """
        decision = self.book(cost, max_wait)
        if not decision.allowed:
            raise ReservationRefused(self.plan.label, decision.retry_after, max_wait)
        return decision.retry_after

    def pause(self, seconds: float) -> Decision:
        """Admit nothing for ``seconds``, then refill from empty (e.g. after a 429)."""
        return self._run(*self.plan.pause(seconds))

    def reset(self) -> None:
        """Forget the buckets' state: they are full again, and slots booked in
        them before now are void (their tickets redeem as ``Verdict.RESET``)."""
        self._run(*self.plan.reset())

    def issue_ticket(self, ticket_id: str, decision: Decision) -> None:
        """Record the slot a granted ``book()`` gave, for ``ticket_id`` to redeem once.

        A caller that waits elsewhere (a deferred task, a parked job) keeps
        only ``ticket_id``; the slot lives in Redis, where no copy of the
        caller can forge or reuse it.
        """
        key, value, ttl_ms = tickets.ticket_entry(self.plan, ticket_id, decision)
        self._guard(lambda: self._redis.set(key, value, px=ttl_ms))

    def redeem(self, ticket_id: str, grace: float, spin: float = 0.0) -> tickets.Redemption:
        """At the booked slot: may the holder of ``ticket_id`` go now?  One round trip.

        ``GO`` when the slot is no more than ``spin`` seconds ahead (sleep
        ``wait``, then go) and no more than ``grace`` seconds behind; see
        ``tickets.Verdict`` for the rest.  The ticket is used up unless ``EARLY``.
        """
        if self._parts:
            marks = [part._markers() for part in self._parts[1:]]
            outside = (0.0, max(m[1] for m in marks), max(m[2] for m in marks))
            return self._parts[0]._redeem(ticket_id, grace, spin, outside)
        return self._redeem(ticket_id, grace, spin, (0.0, 0.0, 0.0))

    def _redeem(
        self, ticket_id: str, grace: float, spin: float, outside: tuple[float, float, float]
    ) -> tickets.Redemption:
        keys, args = tickets.redeem_call(self.plan, ticket_id, grace, spin, outside)
        return tickets.redemption(self._guard(lambda: self.redeem_script(keys=keys, args=args)))

    def _markers(self) -> tuple[float, float, float]:
        keys = [*self.plan.pause_keys, *self.plan.reset_keys]
        return tickets.read_markers(self._guard(lambda: self.status_script(keys=keys)), len(self.plan.pause_keys))

    def server_time(self) -> float:
        """The Redis server's clock, in seconds: the clock every decision uses."""
        seconds, micros = self._guard(self._redis.time)
        return int(seconds) + int(micros) / 1e6

    def slot_status(self) -> tuple[float, float]:
        """(Redis time, end of the latest pause or 0.0), in seconds, in one round trip.

        A caller that booked a slot checks this when its slot should have
        come: run if the time has come and no pause began after the booking.
        """
        if self._parts:
            return slots.merge_statuses([part.slot_status() for part in self._parts])
        return self.plan.status(self._guard(lambda: self.status_script(keys=self.plan.pause_keys)))


class TokenBucket(SingleBucket, SyncBuckets):
    """A token bucket in Redis shared by every process that names the same key.

    ``rate`` is tokens per second (a number, or "10/s", "100/m", "5/h");
    ``burst`` is how many tokens the bucket holds.  Over any ``t`` seconds at
    most ``burst + rate * t`` tokens are granted, fleet-wide.
    """

    def __init__(
        self,
        redis: SyncRedis,
        key: str | bytes,
        *,
        rate: str | float | int | Limit,
        burst: int = 1,
        prefix: str = "throttle",
        strategy: Strategy = "script",
    ) -> None:
        self.bucket = core.make_bucket(key, rate, burst, prefix)
        super().__init__(redis, [self.bucket], strategy)


class MultiBucket(SyncBuckets):
    """Several buckets decided together: granted only if every one can grant.

    ``Decision.refused_by`` names the bucket with the longest wait.  On Redis
    Cluster, buckets whose keys share a hash tag (``{acme}:api``,
    ``{acme}:mail``) are decided in one script call; buckets in different
    slots are decided slot by slot, and tokens taken in one slot are given
    back if a later slot refuses.
    """

    def __init__(self, buckets: Sequence[TokenBucket]) -> None:
        client, parts = core.join(buckets, TokenBucket)
        super().__init__(client, parts, buckets[0].strategy)

    def __repr__(self) -> str:
        return f"MultiBucket({', '.join(repr(b.name) for b in self.plan.buckets)})"


class RedisTokenBucket:
    """The original API, kept so existing code runs unchanged.

    >>> bucket = RedisTokenBucket(redis_client, key="api_rate_limit", burst_rate=5, replenishment_rate=1)
    >>> bucket.consume()
    True

    ``burst_rate`` is the bucket's capacity and ``replenishment_rate`` the
    tokens added per second.  The bucket lives at ``key`` exactly as given, as
    the original implementation kept it (so a rolling upgrade counts in one
    bucket); ``prefix="throttle"`` puts it beside ``TokenBucket``'s.  The
    default engine is the Lua script; ``strategy="transaction"`` keeps the
    original WATCH/MULTI/EXEC design (corrected to use Redis time and bounded,
    jittered retries).
    """

    def __init__(
        self,
        redis_client: SyncRedis,
        key: str | bytes,
        burst_rate: int,
        replenishment_rate: str | float | int,
        *,
        strategy: Strategy = "script",
        prefix: str = "",
    ) -> None:
        self.bucket = TokenBucket(
            redis_client, key, rate=replenishment_rate, burst=burst_rate, prefix=prefix, strategy=strategy
        )
        self.redis = redis_client
        self.key = key
        self.burst_rate = self.bucket.limit.burst
        self.replenishment_rate = self.bucket.limit.rate

    def consume(self, tokens: int = 1) -> bool:
        """Take ``tokens`` if the bucket has them; True if it did."""
        return self.bucket.consume(tokens).allowed

    def decide(self, tokens: int = 1) -> Decision:
        """Like ``consume`` but returns the full ``Decision``."""
        return self.bucket.consume(tokens)
