"""Many decisions in one round trip: ``consume_many``, ``peek_many``, ``book_many``.

A producer fanning out to thousands of tenants, or a worker that prefetched
several tasks, needs one answer per bucket, not one round trip per bucket.
Each decision stays what it is alone (all-or-nothing over its own buckets,
on the server's clock); only the trip is shared: the script's batch mode
decides them one after the other inside one call, in the order given, so two
decisions on the same bucket see each other.

On one Redis server a batch is one EVALSHA (split into calls of at most
``CHUNK`` decisions, sent in one pipeline).  On Redis Cluster the decisions
are grouped by slot, one call per slot, all in one cluster pipeline (one
trip per node).  A ``MultiBucket`` whose buckets span slots, and buckets with
``strategy="transaction"``, are decided on their own, after the batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from ._core import DEFAULT_MAX_WAIT, UNAVAILABLE, Decidable, unavailable
from .aio import AsyncBuckets
from .bucket import SyncBuckets
from .checks import check_seconds, seconds_to_us
from .decision import Decision
from .errors import BackendUnavailable
from .gcra import Mode
from .script import REPLY_LEN
from .slots import is_cluster

__all__ = [
    "consume_many",
    "peek_many",
    "book_many",
    "consume_many_async",
    "peek_many_async",
    "book_many_async",
    "CHUNK",
]

#: Decisions per script call: a call blocks Redis while it runs (~1 us per
#: bucket), so a huge batch is cut into calls of this size.
CHUNK = 500


class _Call:
    """One EVALSHA of the batch mode: its keys, its args and whose replies they are."""

    def __init__(self, mode: Mode, limit_us: int) -> None:
        self.keys: list[str | bytes] = []
        self.args: list[int] = [int(Mode.BATCH), int(mode), limit_us]
        self.owners: list[int] = []  # index into the caller's list, per decision

    def add(self, index: int, bucket: Decidable, cost: int) -> None:
        self.keys.extend(bucket.plan.keys)
        self.args.append(cost)
        self.args.extend(bucket.plan.batch_args)
        self.owners.append(index)


def _plan(
    buckets: Sequence[Decidable], costs: Sequence[int], mode: Mode, limit_us: int
) -> tuple[list[_Call], list[int]]:
    """The script calls for ``buckets``, and the indices to decide one by one."""
    alone: list[int] = []
    by_slot: dict[int, list[_Call]] = {}
    for index, (bucket, cost) in enumerate(zip(buckets, costs, strict=True)):
        slot = bucket.batch_slot
        if slot is None:  # spans cluster slots, or strategy="transaction"
            alone.append(index)
            continue
        calls = by_slot.get(slot)
        if calls is None:
            calls = by_slot[slot] = [_Call(mode, limit_us)]
        elif len(calls[-1].owners) >= CHUNK:
            calls.append(_Call(mode, limit_us))
        calls[-1].add(index, bucket, cost)
    return [call for calls in by_slot.values() for call in calls], alone


def _check(buckets: Sequence[Any], cost: int | Sequence[int], kind: type) -> list[int]:
    """Per-bucket costs, checked; every bucket on the same client."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Sequence):
        raise TypeError(f"buckets must be a sequence of {kind.__name__}, got {type(buckets).__name__}")
    for bucket in buckets:
        if not isinstance(bucket, kind):
            raise TypeError(f"buckets must be {kind.__name__} instances, got {type(bucket).__name__}")
    if buckets and any(b.redis is not buckets[0].redis for b in buckets):
        raise ValueError("buckets must share one redis client to be decided in one round trip")
    if isinstance(cost, Sequence):
        if len(cost) != len(buckets):
            raise ValueError(f"cost must be one number or one per bucket ({len(buckets)}), got {len(cost)}")
        return [b.plan.cost(c) for b, c in zip(buckets, cost, strict=True)]
    return [b.plan.cost(cost) for b in buckets]


def _label(buckets: Sequence[Decidable]) -> str:
    return f"{len(buckets)} buckets ({buckets[0].plan.label}, ...)" if buckets else "no buckets"


@dataclass
class _Batch:
    """One ``*_many`` call: the script calls to send and where their answers go."""

    client: Any
    script: Any
    calls: list[_Call]
    alone: list[int]  # decided one by one (cross-slot MultiBuckets, transaction buckets)
    costs: list[int]
    out: list[Decision | None]

    def unpack(self, buckets: Sequence[Decidable], replies: list[Any]) -> None:
        for call, reply in zip(self.calls, replies, strict=True):
            for j, index in enumerate(call.owners):
                self.out[index] = buckets[index].plan.decision(reply[REPLY_LEN * j : REPLY_LEN * (j + 1)])

    def decisions(self) -> list[Decision]:
        return [d for d in self.out if d is not None]


def _prepare(buckets: Sequence[Any], cost: int | Sequence[int], kind: type, mode: Mode, limit_us: int) -> _Batch:
    costs = _check(buckets, cost, kind)
    calls, alone = _plan(buckets, costs, mode, limit_us) if buckets else ([], [])
    client = buckets[0].redis if buckets else None
    script = buckets[0].script if buckets else None
    return _Batch(client, script, calls, alone, costs, [None] * len(buckets))


#: How a bucket that cannot join a batch call is decided alone (its own method).
_Alone = Callable[[SyncBuckets, int], Decision]
_AloneAsync = Callable[[AsyncBuckets, int], Awaitable[Decision]]


def _many(
    buckets: Sequence[SyncBuckets], cost: int | Sequence[int], mode: Mode, limit_us: int, alone: _Alone
) -> list[Decision]:
    batch = _prepare(buckets, cost, SyncBuckets, mode, limit_us)
    try:
        batch.unpack(buckets, _execute(batch.client, batch.script, batch.calls) if batch.calls else [])
    except redis.exceptions.RedisError as exc:
        if unavailable(exc):
            raise BackendUnavailable(_label(buckets), exc) from exc
        raise
    for index in batch.alone:
        batch.out[index] = alone(buckets[index], batch.costs[index])
    return batch.decisions()


def _execute(client: Any, script: Any, calls: list[_Call]) -> list[Any]:
    """The calls in one pipeline; a server that lost the script gets it again."""

    def send(todo: list[_Call]) -> list[Any]:
        if is_cluster(client):
            return _send_cluster(client, script, todo)
        pipe = client.pipeline(transaction=False)
        for call in todo:
            pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = pipe.execute(raise_on_error=False)
        return results

    results = send(calls)
    missing = _no_script(results)
    if missing:
        # SCRIPT FLUSH, a restart or a failover: those calls did not run.
        if is_cluster(client):
            client.script_load(script.script, target_nodes=client.ALL_NODES)
        else:
            client.script_load(script.script)
        for i, result in zip(missing, send([calls[i] for i in missing]), strict=True):
            results[i] = result
    return _checked(results)


def _no_script(results: list[Any]) -> list[int]:
    """Which calls the server refused for not knowing the script."""
    return [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]


def _checked(results: list[Any]) -> list[Any]:
    """The replies, or the first error among them raised."""
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def _send_cluster(client: Any, script: Any, calls: list[_Call]) -> list[Any]:
    """One pipeline per node (redis-py's cluster pipeline refuses EVALSHA).

    The node of each call comes from the client's slot map; a call that meets
    a moved slot or a lost node is sent again through the cluster client,
    which follows the redirection.
    """
    by_node: dict[str, list[int]] = {}
    nodes: dict[str, Any] = {}
    for i, call in enumerate(calls):
        node = client.get_node_from_key(call.keys[0])
        by_node.setdefault(node.name, []).append(i)
        nodes[node.name] = node
    results: list[Any] = [None] * len(calls)
    for name, indices in by_node.items():
        try:
            pipe = client.get_redis_connection(nodes[name]).pipeline(transaction=False)
            for i in indices:
                pipe.evalsha(script.sha, len(calls[i].keys), *calls[i].keys, *calls[i].args)
            replies = pipe.execute(raise_on_error=False)
        except UNAVAILABLE as exc:
            replies = [exc] * len(indices)
        for i, reply in zip(indices, replies, strict=True):
            results[i] = reply
            if isinstance(reply, (redis.exceptions.ResponseError, *UNAVAILABLE)) and not isinstance(
                reply, redis.exceptions.NoScriptError
            ):
                # MOVED / ASK / a node gone: the cluster client finds the way.
                try:
                    results[i] = client.evalsha(script.sha, len(calls[i].keys), *calls[i].keys, *calls[i].args)
                except redis.exceptions.NoScriptError as exc:
                    results[i] = exc
    return results


def consume_many(buckets: Sequence[SyncBuckets], cost: int | Sequence[int] = 1) -> list[Decision]:
    """``bucket.consume(cost)`` for every bucket, in one round trip; the decisions in order.

    ``cost`` is one number for all or one per bucket.  The buckets
    (``TokenBucket`` or ``MultiBucket``) must share one redis client.
    """
    return _many(buckets, cost, Mode.CONSUME, 0, SyncBuckets.consume)


def peek_many(buckets: Sequence[SyncBuckets], cost: int | Sequence[int] = 1) -> list[Decision]:
    """``bucket.peek(cost)`` for every bucket, in one round trip."""
    return _many(buckets, cost, Mode.PEEK, 0, SyncBuckets.peek)


def book_many(
    buckets: Sequence[SyncBuckets], cost: int | Sequence[int] = 1, max_wait: float = DEFAULT_MAX_WAIT
) -> list[Decision]:
    """``bucket.book(cost, max_wait)`` for every bucket, in one round trip."""
    wait_us = seconds_to_us(check_seconds(max_wait, "max_wait"))
    return _many(buckets, cost, Mode.RESERVE, wait_us, lambda bucket, checked: bucket.book(checked, max_wait))


async def _many_async(
    buckets: Sequence[AsyncBuckets], cost: int | Sequence[int], mode: Mode, limit_us: int, alone: _AloneAsync
) -> list[Decision]:
    batch = _prepare(buckets, cost, AsyncBuckets, mode, limit_us)
    try:
        batch.unpack(buckets, await _execute_async(batch.client, batch.script, batch.calls) if batch.calls else [])
    except redis.exceptions.RedisError as exc:
        if unavailable(exc):
            raise BackendUnavailable(_label(buckets), exc) from exc
        raise
    for index in batch.alone:
        batch.out[index] = await alone(buckets[index], batch.costs[index])
    return batch.decisions()


async def _execute_async(client: Any, script: Any, calls: list[_Call]) -> list[Any]:
    """``_execute`` for a ``redis.asyncio.Redis`` (cluster clients decide one by one)."""

    async def send(todo: list[_Call]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for call in todo:
            pipe.evalsha(script.sha, len(call.keys), *call.keys, *call.args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    results = await send(calls)
    missing = _no_script(results)
    if missing:
        await client.script_load(script.script)
        for i, result in zip(missing, await send([calls[i] for i in missing]), strict=True):
            results[i] = result
    return _checked(results)


async def consume_many_async(buckets: Sequence[AsyncBuckets], cost: int | Sequence[int] = 1) -> list[Decision]:
    """``consume_many`` for ``AsyncTokenBucket`` / ``AsyncMultiBucket``."""
    return await _many_async(buckets, cost, Mode.CONSUME, 0, AsyncBuckets.consume)


async def peek_many_async(buckets: Sequence[AsyncBuckets], cost: int | Sequence[int] = 1) -> list[Decision]:
    """``peek_many`` for asyncio buckets."""
    return await _many_async(buckets, cost, Mode.PEEK, 0, AsyncBuckets.peek)


async def book_many_async(
    buckets: Sequence[AsyncBuckets], cost: int | Sequence[int] = 1, max_wait: float = DEFAULT_MAX_WAIT
) -> list[Decision]:
    """``book_many`` for asyncio buckets."""
    wait_us = seconds_to_us(check_seconds(max_wait, "max_wait"))
    return await _many_async(
        buckets, cost, Mode.RESERVE, wait_us, lambda bucket, checked: bucket.book(checked, max_wait)
    )
