"""The token bucket for asyncio code (``redis.asyncio``), same semantics as sync.

The script, its arguments and the decision it returns are shared with
``throttle.bucket``; only the I/O differs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .bucket import (
    DEFAULT_MAX_WAIT,
    STATUS_SCRIPT,
    UNAVAILABLE,
    Decision,
    _Bucket,
    _Buckets,
    _combine,
    _join,
    _latest_pause,
    _make_bucket,
    _OneBucket,
    _slot_groups,
    is_cluster,
)
from .checks import check_seconds, seconds_to_us
from .errors import BackendUnavailable, ReservationRefused
from .gcra import Mode
from .limit import Limit
from .script import gcra_source

if TYPE_CHECKING:
    import redis.asyncio
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    AsyncRedis = redis.asyncio.Redis | AsyncRedisCluster

__all__ = ["AsyncTokenBucket", "AsyncMultiBucket"]

_T = TypeVar("_T")


class _AsyncBuckets(_Buckets):
    def __init__(self, client: AsyncRedis, buckets: Sequence[_Bucket]) -> None:
        if not hasattr(client, "register_script"):
            raise TypeError(f"redis must be a redis.asyncio client, got {type(client).__name__}")
        self._redis = client
        self._setup(buckets)
        self._script = client.register_script(gcra_source())
        self._status_script = client.register_script(STATUS_SCRIPT) if is_cluster(client) else None
        groups = _slot_groups(client, buckets)
        self._parts = [_AsyncBuckets(client, group) for group in groups] if len(groups) > 1 else []
        # Batches on an asyncio cluster client go one decision at a time.
        self._batch_slot = None if self._parts or self._status_script is not None else 0

    @property
    def redis(self) -> AsyncRedis:
        return self._redis

    async def _guard(self, call: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await call()
        except UNAVAILABLE as exc:
            raise BackendUnavailable(self._label, exc) from exc

    async def _run(self, mode: Mode, cost: int, limit_us: int = 0) -> Decision:
        if self._parts:
            return await self._run_split(mode, cost, limit_us)
        args = self._args(mode, cost, limit_us)
        keys = self._keys + self._pause_keys if mode is Mode.PAUSE else self._keys
        reply: Any = await self._guard(lambda: self._script(keys=keys, args=args))
        return self._decision(reply)

    async def _run_split(self, mode: Mode, cost: int, limit_us: int) -> Decision:
        """Slot by slot, refunding earlier slots on a refusal; see ``MultiBucket``."""
        decisions: list[Decision] = []
        for index, part in enumerate(self._parts):
            decision = await part._run(mode, cost, limit_us)
            decisions.append(decision)
            if not decision.allowed and mode in (Mode.CONSUME, Mode.RESERVE):
                for earlier in self._parts[:index]:
                    await earlier._run(Mode.REFUND, cost)
                break
        return _combine(decisions)

    async def consume(self, cost: int = 1) -> Decision:
        """Take ``cost`` tokens now if every bucket has them; otherwise take none."""
        return await self._run(Mode.CONSUME, self._cost(cost))

    async def peek(self, cost: int = 1) -> Decision:
        """What ``consume(cost)`` would say now, without taking anything."""
        return await self._run(Mode.PEEK, self._cost(cost))

    async def book(self, cost: int = 1, max_wait: float = DEFAULT_MAX_WAIT) -> Decision:
        """Book the next free slot; see ``TokenBucket.book``."""
        wait_us = seconds_to_us(check_seconds(max_wait, "max_wait"))
        return await self._run(Mode.RESERVE, self._cost(cost), wait_us)

    async def reserve(self, cost: int = 1, max_wait: float = DEFAULT_MAX_WAIT) -> float:
        """Book the next free slot and return the seconds to wait for it."""
        decision = await self.book(cost, max_wait)
        if not decision.allowed:
            raise ReservationRefused(self._label, decision.retry_after, max_wait)
        return decision.retry_after

    async def pause(self, seconds: float) -> Decision:
        """Admit nothing for ``seconds``, then refill from empty."""
        pause_us = seconds_to_us(check_seconds(seconds, "seconds"))
        return await self._run(Mode.PAUSE, 1, pause_us)

    async def reset(self) -> None:
        """Forget the bucket's state: it is full again."""
        await self._guard(lambda: self._redis.delete(*self._keys))

    async def server_time(self) -> float:
        """The Redis server's clock, in seconds."""
        seconds, micros = await self._guard(self._redis.time)
        return int(seconds) + int(micros) / 1e6

    async def slot_status(self) -> tuple[float, float]:
        """(Redis time, end of the latest pause or 0.0); see ``TokenBucket.slot_status``."""

        if self._parts:
            statuses = [await part.slot_status() for part in self._parts]
            return min(now for now, _ in statuses), max(paused for _, paused in statuses)

        async def ask() -> list[Any]:
            if self._status_script is not None:
                result: list[Any] = await self._status_script(keys=self._pause_keys)
                return result
            pipe = self._redis.pipeline(transaction=False)
            pipe.time()
            pipe.mget(self._pause_keys)
            return await pipe.execute()

        (seconds, micros), markers = await self._guard(ask)
        return int(seconds) + int(micros) / 1e6, _latest_pause(markers)


class AsyncTokenBucket(_OneBucket, _AsyncBuckets):
    """``TokenBucket`` for ``redis.asyncio`` clients; every method is a coroutine."""

    def __init__(
        self,
        redis: AsyncRedis,
        key: str | bytes,
        *,
        rate: str | float | int | Limit,
        burst: int = 1,
        prefix: str = "throttle",
    ) -> None:
        self.bucket = _make_bucket(key, rate, burst, prefix)
        super().__init__(redis, [self.bucket])


class AsyncMultiBucket(_AsyncBuckets):
    """``MultiBucket`` for ``redis.asyncio`` clients."""

    def __init__(self, buckets: Sequence[AsyncTokenBucket]) -> None:
        client, parts = _join(buckets, AsyncTokenBucket)
        super().__init__(client, parts)
