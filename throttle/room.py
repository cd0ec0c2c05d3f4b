"""The waiting room: long waits parked in Redis, ordered by when to release them.

A task whose booked slot is minutes or hours away should not sit in a
worker's memory as a countdown message (Celery fetches it at once and holds
it unacknowledged until it is due).  It is parked here instead: the whole
message, in a sorted set by release time, in the buckets' Redis.  Workers
release what is due back to the broker shortly before its slot
(``throttle.celery.release``); any worker can, none has to.

Keys of one room (``throttle.keys.RoomKeys``; the room's own hash tag, so
rooms spread over a cluster's shards like their buckets):

- ``entries``  zset  entry -> release time (Redis us)
- ``messages`` hash  entry -> the parked message (bytes, as the caller packed it)
- ``claims``   zset  entry -> claim expiry: taken by a releaser, not yet acknowledged
- ``plan``     hash  "version" -> the limit version the release times follow
- ``since``    zset  entry -> when it was parked (the oldest entry's age)
- ``released:<entry>``  which copy of a released message arrived first

and ``<prefix>:~{rooms}``, the index: zset room -> earliest release time,
which releasers read to find the rooms with work.

Release is at least once: a releaser claims due entries (atomically: two
releasers never take the same entry), publishes them, then acknowledges.
A releaser killed between its claim and its acknowledgement gives the
entries back when the claim expires (``hold``), and they are published
again; ``first_arrival`` lets the consumer drop the second copy.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from . import script as scripts
from .keys import RoomKeys, rooms_key
from .limit import US_PER_S, Limit

__all__ = ["WaitingRoom", "Parked", "Claim", "RoomStats", "persistence_warning", "ARRIVAL_MEMORY_S"]

logger = logging.getLogger("throttle")

#: How long the marker of a released task's first arrival is kept: well past
#: a claim's hold (30 s) plus a release's countdown (2 s) plus a broker
#: backlog; a second copy that arrives later still than this would run.
ARRIVAL_MEMORY_S = 900.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Parked:
    """One claimed entry: release it at ``release_at`` (Redis time, seconds)."""

    entry: str
    release_at: float
    message: bytes


@dataclass(frozen=True)
class Claim:
    """What one claim took from a room, and when the room has work next."""

    now: float  # Redis time of the claim, seconds
    next_at: float | None  # earliest release or claim expiry left (None: the room is empty)
    parked: list[Parked] = field(default_factory=list)


@dataclass(frozen=True)
class RoomStats:
    """How many tasks wait in a room and when they are released (Redis time, seconds)."""

    room: str
    parked: int
    claimed: int
    next_at: float | None
    last_at: float | None
    oldest_at: float | None = None  # when the entry parked longest ago was parked


class WaitingRoom:
    """Park, claim, acknowledge, re-plan: the operations on the rooms under one prefix."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix
        self.index = rooms_key(prefix)
        self._park = scripts.register(redis, "room_park")
        self._claim = scripts.register(redis, "room_claim")
        self._ack = scripts.register(redis, "room_ack")
        self._replan = scripts.register(redis, "room_replan")
        self._arrival = scripts.register(redis, "room_arrival")

    def keys(self, room: str) -> RoomKeys:
        return RoomKeys(self.prefix, room)

    def park(self, room: str, entry: str, release_at: float, message: bytes, version: int) -> None:
        """Park ``message`` as ``entry`` until ``release_at`` (Redis time, seconds)."""
        if not entry:
            raise ValueError(f"entry must be a non-empty str, got {entry!r}")
        keys = self.keys(room)
        at_us = round(release_at * US_PER_S)
        earliest = self._park(
            keys=[keys.entries, keys.messages, keys.plan, keys.since], args=[entry, at_us, message, version]
        )
        # Two round trips, not one script: on a cluster the index and the
        # room live in different slots.  LT: only ever moves it earlier.
        self.redis.zadd(self.index, {room: float(earliest)}, lt=True)

    def due(self, ahead: float, limit: int = 200) -> tuple[float, list[str]]:
        """(Redis now, rooms with something to release within ``ahead`` seconds)."""
        seconds, micros = self.redis.time()
        now_us = int(seconds) * US_PER_S + int(micros)
        rooms = self.redis.zrangebyscore(self.index, "-inf", now_us + round(ahead * US_PER_S), start=0, num=limit)
        return now_us / US_PER_S, [_text(r) for r in rooms]

    def claim(self, room: str, ahead: float, hold: float, limit: int) -> Claim:
        """Take up to ``limit`` entries due within ``ahead`` seconds, for ``hold`` seconds."""
        keys = self.keys(room)
        args = [round(ahead * US_PER_S), round(hold * US_PER_S), limit]
        reply = self._claim(keys=[keys.entries, keys.messages, keys.claims, keys.plan, keys.since], args=args)
        now, next_at, rest = int(reply[0]) / US_PER_S, _text(reply[1]), reply[2:]
        parked = [
            Parked(_text(rest[i]), float(rest[i + 1]) / US_PER_S, bytes(rest[i + 2])) for i in range(0, len(rest), 3)
        ]
        return Claim(now, float(next_at) / US_PER_S if next_at else None, parked)

    def ack(self, room: str, entries: Sequence[str]) -> int:
        """The claimed ``entries`` were published: forget them."""
        if not entries:
            return 0
        keys = self.keys(room)
        return int(
            self._ack(keys=[keys.entries, keys.messages, keys.claims, keys.plan, keys.since], args=list(entries))
        )

    def reindex(self, room: str, next_at: float | None) -> None:
        """Put ``room`` in the index at ``next_at`` (None: take it out), then look again.

        A task parked meanwhile added itself to the room before the index;
        reading the room after writing the index finds it, so no parked entry
        is ever left out of the index.
        """
        if next_at is None:
            self.redis.zrem(self.index, room)
        else:
            self.redis.zadd(self.index, {room: round(next_at * US_PER_S)})
        earliest = self._earliest(room)
        if earliest is not None:
            # LT moves an existing entry earlier and adds a missing one.
            self.redis.zadd(self.index, {room: earliest}, lt=True)

    def settle(self, room: str) -> None:
        """Put ``room`` in the index at its earliest release or claim, or take it out when empty."""
        self.reindex(room, self._earliest(room))

    def _earliest(self, room: str) -> float | None:
        keys = self.keys(room)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(keys.entries, 0, 0, withscores=True)
        pipe.zrange(keys.claims, 0, 0, withscores=True)
        scores = [found[0][1] for found in pipe.execute() if found]
        return min(scores) if scores else None

    def planned_version(self, room: str) -> int | None:
        """The limit version ``room``'s release times follow (None: no plan, an empty room)."""
        value = self.redis.hget(self.keys(room).plan, "version")
        return int(value) if value is not None else None

    def replan(self, room: str, version: int, limit: Limit | None) -> int:
        """Spread ``room``'s entries from now at ``limit`` (None: all due now); how many."""
        keys = self.keys(room)
        interval, burst = (limit.interval_us, limit.burst) if limit is not None else (0, 1)
        count = int(self._replan(keys=[keys.entries, keys.plan], args=[version, interval, burst]))
        self.settle(room)
        return count

    def first_arrival(self, room: str, entry: str, copy: str, remember: float) -> bool:
        """Whether this ``copy`` of released ``entry`` is the one to run (see ``lua/room_arrival.lua``)."""
        key = self.keys(room).released + entry
        return bool(self._arrival(keys=[key], args=[copy, round(remember * 1000)]))

    def rooms(self, limit: str | None = None) -> list[str]:
        """Rooms in the index (of ``limit`` only, if given).

        One limit's rooms are found with ZSCAN MATCH, so a change of one
        limit on a fleet with a million tenants' rooms of other limits
        transfers only its own (limit names hold no glob characters).
        """
        if limit is None:
            return [_text(r) for r in self.redis.zrange(self.index, 0, -1)]
        names = [_text(member) for member, _ in self.redis.zscan_iter(self.index, match=f"{limit}:*", count=1000)]
        if self.redis.zscore(self.index, limit) is not None:
            names.append(limit)
        return sorted(set(names))

    def rooms_due_first(self, most: int) -> tuple[list[str], int]:
        """The ``most`` rooms with the earliest releases, and how many rooms the index holds."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrange(self.index, 0, most - 1)
        pipe.zcard(self.index)
        names, total = pipe.execute()
        return [_text(r) for r in names], int(total)

    def stats(self, rooms: Sequence[str]) -> list[RoomStats]:
        """Counts and release times of ``rooms`` (one pipelined round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for room in rooms:
            keys = self.keys(room)
            pipe.zcard(keys.entries)
            pipe.zcard(keys.claims)
            pipe.zrange(keys.entries, 0, 0, withscores=True)
            pipe.zrange(keys.entries, -1, -1, withscores=True)
            pipe.zrange(keys.since, 0, 0, withscores=True)
        replies = pipe.execute() if rooms else []
        out = []
        for i, room in enumerate(rooms):
            parked, claimed, first, last, oldest = replies[5 * i : 5 * i + 5]
            out.append(
                RoomStats(
                    room,
                    int(parked),
                    int(claimed),
                    first[0][1] / US_PER_S if first else None,
                    last[0][1] / US_PER_S if last else None,
                    oldest[0][1] / US_PER_S if oldest else None,
                )
            )
        return out


def persistence_warning(redis: Any) -> str | None:
    """Why parked tasks would not survive a restart of this Redis (None: they would).

    Parked tasks exist only in Redis: without an append-only file or RDB
    snapshots, a restart loses them.  Managed Redis may refuse CONFIG; then
    INFO alone decides.
    """
    try:
        info = redis.info("persistence")
    except RedisError as exc:
        return f"could not read INFO persistence ({exc}); make sure the Redis that holds parked tasks persists them"
    if int(info.get("aof_enabled", 0)):
        return None
    try:
        save = redis.config_get("save").get("save", "")
    except ResponseError:
        save = None  # CONFIG refused (managed Redis, ACLs): RDB settings unknown
    if save:
        return None if info.get("rdb_last_bgsave_status", "ok") == "ok" else "the last RDB snapshot failed"
    if save is None:
        return (
            "appendonly is off and CONFIG GET save is refused: parked tasks survive a restart only if "
            "this Redis takes RDB snapshots"
        )
    return 'appendonly is off and RDB snapshots are off (save ""): parked tasks are lost if this Redis restarts'
