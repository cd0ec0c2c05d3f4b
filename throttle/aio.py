"""The token bucket for asyncio code (``redis.asyncio``), same semantics as sync.

This module mirrors ``throttle.bucket`` method for method; the script, its
arguments, the split over cluster slots and the decision it returns come from
the shared core (``throttle._core``): only the I/O differs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis.exceptions import RedisError

from . import _core as core
from . import slots, tickets
from ._core import BucketRef, BucketsBase, SingleBucket
from .decision import Decision
from .errors import BackendUnavailable, ReservationRefused
from .gcra import Mode
from .limit import Limit

if TYPE_CHECKING:
    import redis.asyncio
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    AsyncRedis = redis.asyncio.Redis | AsyncRedisCluster

__all__ = ["AsyncTokenBucket", "AsyncMultiBucket", "AsyncBuckets"]

_T = TypeVar("_T")


class AsyncBuckets(BucketsBase):
    """``SyncBuckets`` for ``redis.asyncio`` clients; every method is a coroutine."""

    def __init__(self, client: AsyncRedis, buckets: Sequence[BucketRef]) -> None:
        super().__init__(client, buckets, "redis.asyncio")
        self._parts = [AsyncBuckets(client, group) for group in self.groups] if len(self.groups) > 1 else []
        # Batches on an asyncio cluster client go one decision at a time.
        self.batch_slot = None if self._parts or slots.is_cluster(client) else 0

    @property
    def redis(self) -> AsyncRedis:
        return cast("AsyncRedis", self._redis)

    async def _guard(self, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await call()
        except RedisError as exc:
            if core.unavailable(exc):
                raise BackendUnavailable(self.plan.label, exc) from exc
            raise

    async def _run(self, mode: Mode, cost: int, limit_us: int = 0) -> Decision:
        plan = self.plan
        if self._parts:
            split = slots.Split(len(self._parts), mode, cost, limit_us)
            while not split.answer(await self._parts[split.index]._run(*split.call)):
                pass
            return cast(Decision, split.result)
        args = plan.args(mode, cost, limit_us)
        reply: Any = await self._guard(lambda: self.script(keys=plan.keys_for(mode), args=args))
        return plan.decision(reply)

    async def consume(self, cost: int = 1) -> Decision:
        """See ``TokenBucket.consume``."""
        return await self._run(Mode.CONSUME, self.plan.cost(cost))

    async def peek(self, cost: int = 1) -> Decision:
        """See ``TokenBucket.peek``."""
        return await self._run(Mode.PEEK, self.plan.cost(cost))

    async def book(self, cost: int = 1, max_wait: float = core.DEFAULT_MAX_WAIT) -> Decision:
        """Book the next free slot; see ``TokenBucket.book``."""
        return await self._run(*self.plan.book(cost, max_wait))

    async def reserve(self, cost: int = 1, max_wait: float = core.DEFAULT_MAX_WAIT) -> float:
        """Book the next free slot and return the seconds to wait for it."""
        decision = await self.book(cost, max_wait)
        if not decision.allowed:
            raise ReservationRefused(self.plan.label, decision.retry_after, max_wait)
        return decision.retry_after

    async def pause(self, seconds: float) -> Decision:
        """Admit nothing for ``seconds``, then refill from empty."""
        return await self._run(*self.plan.pause(seconds))

    async def reset(self) -> None:
        """See ``TokenBucket.reset``."""
        await self._run(*self.plan.reset())

    async def issue_ticket(self, ticket_id: str, decision: Decision) -> None:
        """See ``TokenBucket.issue_ticket``."""
        key, value, ttl_ms = tickets.ticket_entry(self.plan, ticket_id, decision)
        await self._guard(lambda: self._redis.set(key, value, px=ttl_ms))

    async def redeem(self, ticket_id: str, grace: float, spin: float = 0.0) -> tickets.Redemption:
        """See ``TokenBucket.redeem``."""
        if self._parts:
            marks = [await part._markers() for part in self._parts[1:]]
            outside = (0.0, max(m[1] for m in marks), max(m[2] for m in marks))
            return await self._parts[0]._redeem(ticket_id, grace, spin, outside)
        return await self._redeem(ticket_id, grace, spin, (0.0, 0.0, 0.0))

    async def _redeem(
        self, ticket_id: str, grace: float, spin: float, outside: tuple[float, float, float]
    ) -> tickets.Redemption:
        keys, args = tickets.redeem_call(self.plan, ticket_id, grace, spin, outside)
        reply: Any = await self._guard(lambda: self.redeem_script(keys=keys, args=args))
        return tickets.redemption(reply)

    async def _markers(self) -> tuple[float, float, float]:
        keys = [*self.plan.pause_keys, *self.plan.reset_keys]
        reply: Any = await self._guard(lambda: self.status_script(keys=keys))
        return tickets.read_markers(reply, len(self.plan.pause_keys))

    async def server_time(self) -> float:
        """The Redis server's clock, in seconds."""
        seconds, micros = await self._guard(self._redis.time)
        return int(seconds) + int(micros) / 1e6

    async def slot_status(self) -> tuple[float, float]:
        """(Redis time, end of the latest pause or 0.0); see ``TokenBucket.slot_status``."""
        if self._parts:
            return slots.merge_statuses([await part.slot_status() for part in self._parts])
        return self.plan.status(await self._guard(lambda: self.status_script(keys=self.plan.pause_keys)))


class AsyncTokenBucket(SingleBucket, AsyncBuckets):
    """``TokenBucket`` for ``redis.asyncio`` clients; every method is a coroutine."""

    def __init__(
        self, redis: AsyncRedis, key: str | bytes, *, rate: str | float | int | Limit, burst: int = 1,
        prefix: str = "throttle",
    ) -> None:  # fmt: skip
        self.bucket = core.make_bucket(key, rate, burst, prefix)
        super().__init__(redis, [self.bucket])


class AsyncMultiBucket(AsyncBuckets):
    """``MultiBucket`` for ``redis.asyncio`` clients."""

    def __init__(self, buckets: Sequence[AsyncTokenBucket]) -> None:
        client, parts = core.join(buckets, AsyncTokenBucket)
        super().__init__(client, parts)
