"""What the sync and asyncio buckets share: everything but the I/O.

``throttle.bucket`` (redis-py) and ``throttle.aio`` (redis.asyncio) mirror each
other method for method; both build on this module (and on ``slots`` for
Redis Cluster, ``tickets`` for booked slots), so the rules live once: which
keys and ARGV a decision sends (``ScriptPlan``), how a reply becomes a
``Decision``, and which errors mean "Redis cannot answer" (``UNAVAILABLE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.exceptions

from .checks import check_cost, check_key, check_prefix, check_seconds, seconds_to_us
from .decision import Decision
from .gcra import Mode
from .keys import BucketKeys, keys_label
from .limit import US_PER_S, Limit
from .script import register, script_args
from .slots import slot_groups
from .tickets import RESET_MARKER_US

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
        return Mode.RESET, 1, RESET_MARKER_US

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
