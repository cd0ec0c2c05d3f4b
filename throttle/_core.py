"""What the sync and asyncio buckets share: everything but the I/O.

``throttle.bucket`` (redis-py) and ``throttle.aio`` (redis.asyncio) mirror each
other method for method; both build on this module, so the rules live once:
which keys and ARGV a decision sends (``ScriptPlan``), how a reply becomes a
``Decision``, how decisions that span Redis Cluster slots are taken slot by
slot with refunds (``split_steps``), and which errors mean "Redis cannot
answer" (``UNAVAILABLE``).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import redis.exceptions
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from .checks import check_cost, check_key, check_prefix, check_seconds, seconds_to_us
from .gcra import Mode
from .keys import BucketKeys, keys_label
from .limit import MAX_WAIT_SECONDS, US_PER_S, Limit
from .script import register, script_args

__all__ = [
    "UNAVAILABLE",
    "unavailable",
    "DEFAULT_MAX_WAIT",
    "Decision",
    "BucketRef",
    "ScriptPlan",
    "BucketsBase",
    "SingleBucket",
    "Decidable",
    "make_bucket",
    "join",
    "is_cluster",
    "slot_of",
    "slot_groups",
    "split_steps",
    "Split",
    "combine",
    "merge_statuses",
    "Verdict",
    "Redemption",
    "TICKET_SLACK_S",
]

#: Errors that mean "Redis cannot or will not answer right now", as opposed
#: to a bug: the server is gone, loading, read-only, out of memory, refuses
#: the user, or a cluster is reshaping.  The Celery gate applies its
#: ``throttle_on_backend_error`` policy to each of them.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (LOADING) and AuthenticationError (NOAUTH, WRONGPASS)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # READONLY: talking to a replica after a failover
    redis.exceptions.OutOfMemoryError,  # OOM: maxmemory reached with a no-eviction policy
    redis.exceptions.NoPermissionError,  # NOPERM: the ACL user may not run the script or touch the key
    redis.exceptions.ClusterDownError,  # includes MasterDownError
    redis.exceptions.TryAgainError,
    redis.exceptions.SlotNotCoveredError,
)

#: Error replies redis-py has no class for that mean the same: a script
#: running too long (BUSY), a failed RDB save refusing writes (MISCONF),
#: too few replicas for min-replicas-to-write (NOREPLICAS).
_REFUSALS = ("BUSY", "MISCONF", "NOREPLICAS")


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis cannot or will not answer now (see ``UNAVAILABLE``)."""
    if isinstance(exc, UNAVAILABLE):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).split(" ", 1)[0] in _REFUSALS


#: ``reserve()`` books at most this far ahead unless told otherwise.
DEFAULT_MAX_WAIT = 60.0

#: A ticket outlives its slot by this much: a task later than that finds no
#: ticket and books again (it would be "late" anyway).
TICKET_SLACK_S = 3600.0

#: Reset markers live as long as any slot booked before them can be ahead.
_RESET_MARKER_US = (MAX_WAIT_SECONDS + int(TICKET_SLACK_S)) * US_PER_S


class Verdict(IntEnum):
    """What ``redeem`` says of a ticket (the values are ``lua/redeem.lua``'s)."""

    NONE = 0  # no ticket (never booked, already redeemed, forged, expired): book again
    GO = 1  # the slot has come: run
    EARLY = 2  # the slot is still ahead: wait again (the ticket stays)
    LATE = 3  # too late for the slot: book again
    PAUSED = 4  # a pause began after the booking and ends after the slot: book again
    RESET = 5  # the bucket was reset after the booking: book again


@dataclass(frozen=True)
class Redemption:
    """A ticket redeemed: the verdict, ``wait`` = slot - now in seconds (negative when late)."""

    verdict: Verdict
    wait: float
    server_time: float


@dataclass(frozen=True)
class Decision:
    """What the bucket said.  ``bool(decision)`` is ``allowed``.

    - ``remaining``: whole tokens left (in the emptiest bucket of a multi-limit).
    - ``retry_after``: seconds until the same call could be granted; for a
      reservation, seconds until the booked slot.  Never rounded down.
    - ``reset_after``: seconds until every bucket is full again.
    - ``refused_by``: the name of the bucket that refused (longest wait), or None.
    - ``server_time``: the Redis time, in seconds, the decision was made at.
    - ``recovered``: a bucket held a value throttle did not write; it was
      treated as empty (the limit errs on the safe side).
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float
    refused_by: str | bytes | None = None
    server_time: float = 0.0
    recovered: bool = False

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True)
class BucketRef:
    """One bucket's name (as the user gave it), Redis keys and limit."""

    name: str | bytes
    keys: BucketKeys
    limit: Limit

    @property
    def key(self) -> str | bytes:
        return self.keys.bucket


def make_bucket(key: object, rate: Any, burst: Any, prefix: object) -> BucketRef:
    name = check_key(key)
    limit = rate if isinstance(rate, Limit) else Limit(rate, burst)
    return BucketRef(name, BucketKeys(check_prefix(prefix), name), limit)


class SingleBucket:
    """What a single bucket (sync or asyncio) adds to a set of one: its key and limit."""

    bucket: BucketRef

    @property
    def key(self) -> str | bytes:
        """The Redis key holding this bucket's state."""
        return self.bucket.key

    @property
    def limit(self) -> Limit:
        return self.bucket.limit

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.bucket.name!r}, {self.limit})"


class ScriptPlan:
    """How ``gcra.lua`` is called for one set of buckets: computed once, then looked up.

    The hot path (one decision) only picks cached ARGV and unpacks the reply.
    """

    def __init__(self, buckets: Sequence[BucketRef]) -> None:
        self.buckets = tuple(buckets)
        self.keys = [b.key for b in self.buckets]
        self.pause_keys = [b.keys.paused for b in self.buckets]
        self.reset_keys = [b.keys.reset for b in self.buckets]
        self.limits = [b.limit for b in self.buckets]
        self.min_burst = min(b.limit.burst for b in self.buckets)
        self.label = keys_label(self.keys)
        #: This decision's part of a batch call's ARGV after its cost (throttle.batch).
        self.batch_args = [len(self.limits)] + [v for lim in self.limits for v in (lim.interval_us, lim.tau_us)]
        self._argv: dict[tuple[Mode, int, int], list[int]] = {}

    def cost(self, cost: object) -> int:
        """``cost`` checked against the smallest burst (fast path for the common int)."""
        if type(cost) is int and 1 <= cost <= self.min_burst:
            return cost
        return check_cost(cost, self.min_burst)

    def keys_for(self, mode: Mode) -> list[str | bytes]:
        """KEYS of a call: the buckets, and their pause or reset markers when pausing or resetting."""
        if mode is Mode.PAUSE:
            return self.keys + self.pause_keys
        return self.keys + self.reset_keys if mode is Mode.RESET else self.keys

    def args(self, mode: Mode, cost: int, limit_us: int = 0) -> list[int]:
        signature = (mode, cost, limit_us)
        args = self._argv.get(signature)
        if args is None:
            args = script_args(self.limits, cost, mode, limit_us)
            if len(self._argv) < 64:  # costs and waits vary; keep the cache small
                self._argv[signature] = args
        return args

    def book(self, cost: object, max_wait: object) -> tuple[Mode, int, int]:
        """(mode, cost, limit_us) of ``book``: both arguments checked."""
        return Mode.RESERVE, self.cost(cost), seconds_to_us(check_seconds(max_wait, "max_wait"))

    @staticmethod
    def pause(seconds: object) -> tuple[Mode, int, int]:
        """(mode, cost, limit_us) of ``pause``."""
        return Mode.PAUSE, 1, seconds_to_us(check_seconds(seconds, "seconds"))

    @staticmethod
    def reset() -> tuple[Mode, int, int]:
        """(mode, cost, limit_us) of ``reset``: the reset markers' lifetime."""
        return Mode.RESET, 1, _RESET_MARKER_US

    def ticket(self, ticket_id: object, decision: Decision) -> tuple[str | bytes, str, int]:
        """(key, value, ttl_ms) of the ticket for a booked ``decision``."""
        if not isinstance(ticket_id, str) or not ticket_id:
            raise ValueError(f"ticket_id must be a non-empty str, got {ticket_id!r}")
        if not decision.allowed:
            raise ValueError("a ticket is for a granted booking; this decision was refused")
        booked = round(decision.server_time * US_PER_S)
        slot = booked + math.ceil(decision.retry_after * US_PER_S)
        ttl_ms = math.ceil((decision.retry_after + TICKET_SLACK_S) * 1000)
        return self.buckets[0].keys.ticket(ticket_id), f"{slot}:{booked}", ttl_ms

    def redeem_call(
        self, ticket_id: str, grace: float, spin: float, outside: tuple[float, float, float]
    ) -> tuple[list[str | bytes], list[int]]:
        """KEYS and ARGV of ``redeem.lua``; ``outside``: (now, pause end, reset) of other slots."""
        check_key(ticket_id, "ticket_id")
        keys = [self.buckets[0].keys.ticket(ticket_id), *self.pause_keys, *self.reset_keys]
        _, paused, reset = outside
        args = [
            seconds_to_us(check_seconds(grace, "grace")),
            seconds_to_us(check_seconds(spin, "spin")),
            round(paused * US_PER_S),
            round(reset * US_PER_S),
        ]
        return keys, args

    @staticmethod
    def redemption(reply: Sequence[int]) -> Redemption:
        verdict, wait_us, now_us = reply
        return Redemption(Verdict(int(verdict)), int(wait_us) / US_PER_S, int(now_us) / US_PER_S)

    @staticmethod
    def markers(reply: Sequence[Any], pauses: int) -> tuple[float, float, float]:
        """``slot_status.lua``'s reply over pause then reset markers: (now, latest pause end, latest reset)."""
        (seconds, micros), values = reply
        numbers = [int(v) if v and (v if isinstance(v, str) else v.decode()).isdigit() else 0 for v in values]
        paused, reset = numbers[:pauses], numbers[pauses:]
        return (
            int(seconds) + int(micros) / US_PER_S,
            max(paused, default=0) / US_PER_S,
            max(reset, default=0) / US_PER_S,
        )

    @staticmethod
    def status(reply: Sequence[Any]) -> tuple[float, float]:
        """``slot_status.lua``'s reply as (Redis time, end of the latest pause or 0.0), in seconds."""
        (seconds, micros), markers = reply
        ends = [int(m) for m in markers if m and (m if isinstance(m, str) else m.decode()).isdigit()]
        return int(seconds) + int(micros) / US_PER_S, (max(ends) / US_PER_S if ends else 0.0)

    def decision(self, reply: Sequence[int]) -> Decision:
        granted, refused, wait_us, remaining, reset_us, now_us, recovered = reply
        return Decision(
            allowed=granted == 1,
            remaining=remaining,
            retry_after=wait_us / US_PER_S,
            reset_after=reset_us / US_PER_S,
            refused_by=self.buckets[refused - 1].name if refused else None,
            server_time=now_us / US_PER_S,
            recovered=recovered == 1,
        )


class BucketsBase:
    """The client-side state of a set of buckets, sync or asyncio alike.

    ``plan`` says how the script is called for them; ``script`` is the
    registered ``gcra.lua``; ``groups`` are the buckets by Redis Cluster slot
    (one group on a single server); ``batch_slot`` is the batch call they can
    join in ``consume_many`` (None: decided alone).
    """

    def __init__(self, client: Any, buckets: Sequence[BucketRef], client_kind: str) -> None:
        if not hasattr(client, "register_script"):
            raise TypeError(f"redis must be a {client_kind} client, got {type(client).__name__}")
        self._redis = client
        self.plan = ScriptPlan(buckets)
        self.script = register(client, "gcra")
        self.status_script = register(client, "slot_status")
        self.redeem_script = register(client, "redeem")
        self.groups = slot_groups(client, buckets)
        self.batch_slot: int | None = None

    @property
    def keys(self) -> list[str | bytes]:
        """The buckets' Redis keys."""
        return list(self.plan.keys)

    @property
    def limits(self) -> list[Limit]:
        return list(self.plan.limits)


class Decidable(Protocol):
    """What ``throttle.batch`` needs of a bucket (sync or asyncio): its plan,
    its client, its registered ``gcra.lua``, and the batch call it can join
    (its cluster slot, 0 on one server, None when it must be decided alone)."""

    @property
    def plan(self) -> ScriptPlan: ...
    @property
    def redis(self) -> Any: ...
    @property
    def script(self) -> Any: ...
    @property
    def batch_slot(self) -> int | None: ...


def join(buckets: Sequence[Any], kind: type) -> tuple[Any, list[BucketRef]]:
    """Check that ``buckets`` (single buckets of ``kind``) can be decided together; (client, refs)."""
    if isinstance(buckets, (str, bytes)) or not buckets:
        raise ValueError(f"buckets must name at least one {kind.__name__}, got {buckets!r}")
    for bucket in buckets:
        if not isinstance(bucket, kind):
            raise TypeError(f"buckets must be {kind.__name__} instances, got {type(bucket).__name__}")
    client = buckets[0].redis
    if any(b.redis is not client for b in buckets):
        raise ValueError("buckets must share one redis client to be decided in one round trip")
    refs: list[BucketRef] = [b.bucket for b in buckets]
    keys = [r.key for r in refs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"buckets must have distinct keys, got {keys!r}")
    return client, refs


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
