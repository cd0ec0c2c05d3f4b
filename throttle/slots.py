"""Decisions over buckets in several Redis Cluster slots.

One script call can only touch keys of one slot.  Buckets meant to be
decided together should share a hash tag (``{acme}:api``, ``{acme}:mail``);
those that do not are decided slot by slot, in order (``split_steps``,
driven by ``Split`` for the sync and asyncio buckets alike), and the
decisions combined into one.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from .decision import Decision
from .gcra import Mode

if TYPE_CHECKING:
    from ._core import BucketRef

__all__ = ["is_cluster", "slot_of", "slot_groups", "split_steps", "Split", "combine", "merge_statuses"]


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a redis-py Redis Cluster client (sync or asyncio)."""
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def slot_of(key: str | bytes) -> int:
    """The Redis Cluster slot of ``key``."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def slot_groups(client: object, buckets: Sequence[BucketRef]) -> list[list[BucketRef]]:
    """The buckets grouped by Redis Cluster slot, in order; one group elsewhere."""
    if not is_cluster(client):
        return [list(buckets)]
    groups: dict[int, list[BucketRef]] = {}
    for bucket in buckets:
        groups.setdefault(slot_of(bucket.key), []).append(bucket)
    return list(groups.values())


#: One step of a split decision: (index of the slot's part, mode, cost, limit_us).
Step = tuple[int, Mode, int, int]


def split_steps(parts: int, mode: Mode, cost: int, limit_us: int) -> Generator[Step, Decision, Decision]:
    """Decide slot by slot: each slot's buckets atomically, in order.

    Yields the calls to make and is sent their decisions (the caller does the
    I/O, sync or async).  A consume refused in a later slot gives the tokens
    taken in the earlier ones back (``Mode.REFUND``): tokens are
    interchangeable, so giving back is exact even if others took some in
    between.  Booked slots are not: rewinding a bucket after another caller
    booked behind us would hand our slot out twice, so a refused booking
    leaves the earlier slots' bookings in place (forfeit).  Either way the
    limit can only err on the safe side; if Redis fails half-way, what was
    taken stays taken, for the same reason.
    """
    decisions: list[Decision] = []
    for index in range(parts):
        decision = yield index, mode, cost, limit_us
        decisions.append(decision)
        if not decision.allowed and mode in (Mode.CONSUME, Mode.RESERVE):
            for earlier in range(index) if mode is Mode.CONSUME else ():
                yield earlier, Mode.REFUND, cost, 0
            break
    return combine(decisions)


class Split:
    """Drives ``split_steps`` for a caller that does the I/O::

    split = Split(len(parts), mode, cost, limit_us)
    while not split.answer(parts[split.index].run(*split.call)):
        pass
    return split.result
    """

    def __init__(self, parts: int, mode: Mode, cost: int, limit_us: int) -> None:
        self._steps = split_steps(parts, mode, cost, limit_us)
        self.index, first_mode, first_cost, first_limit = next(self._steps)
        self.call: tuple[Mode, int, int] = (first_mode, first_cost, first_limit)
        self.result: Decision | None = None

    def answer(self, decision: Decision) -> bool:
        """Hand in the decision of the current call; True once the result is known."""
        try:
            self.index, mode, cost, limit_us = self._steps.send(decision)
        except StopIteration as done:
            self.result = done.value
            return True
        self.call = (mode, cost, limit_us)
        return False


def combine(decisions: Sequence[Decision]) -> Decision:
    """One decision from those of several slots.

    Refused: the longest refusal speaks.  Granted: the latest slot of all,
    measured from the latest clock (shards' clocks are assumed NTP-synced).
    """
    now = max(d.server_time for d in decisions)
    refused = [d for d in decisions if not d.allowed]
    if refused:
        worst = max(refused, key=lambda d: d.retry_after)
        wait, refused_by = worst.retry_after, worst.refused_by
    else:
        wait, refused_by = max(0.0, max(d.server_time + d.retry_after for d in decisions) - now), None
    return Decision(
        allowed=not refused,
        remaining=min(d.remaining for d in decisions),
        retry_after=wait,
        reset_after=max(d.reset_after for d in decisions),
        refused_by=refused_by,
        server_time=now,
        recovered=any(d.recovered for d in decisions),
    )


def merge_statuses(statuses: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Several slots' statuses as one: the earliest clock, the latest pause."""
    return min(now for now, _ in statuses), max(paused for _, paused in statuses)
