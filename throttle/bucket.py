"""The shared token bucket: one Redis round trip per decision.

``TokenBucket`` decides one bucket; ``MultiBucket`` decides several at once,
all-or-nothing ("10/s AND 5000/h AND this tenant's 1/s").  Both run
``lua/gcra.lua`` with EVALSHA; the script reads the Redis server's clock, so
every host in the fleet is judged by one clock whatever its own says.

``RedisTokenBucket`` is the original API (``consume() -> bool``) on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import redis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from .checks import check_cost, check_key, check_prefix, check_seconds, full_key, seconds_to_us
from .errors import BackendUnavailable, ReservationRefused
from .gcra import Mode
from .limit import Limit
from .script import gcra_source, script_args
from .transaction import run_transaction

if TYPE_CHECKING:
    SyncRedis = redis.Redis | RedisCluster

__all__ = ["Decision", "TokenBucket", "MultiBucket", "RedisTokenBucket", "UNAVAILABLE", "DEFAULT_MAX_WAIT"]

#: Errors that mean "Redis cannot answer right now", as opposed to a bug.
UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError (restart, loading)
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # talking to a replica after a failover
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.SlotNotCoveredError,
)

#: ``reserve()`` books at most this far ahead unless told otherwise.
DEFAULT_MAX_WAIT = 60.0

Strategy = Literal["script", "transaction"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Decision:
    """What the bucket said.  ``bool(decision)`` is ``allowed``.

    - ``remaining``: whole tokens left (in the emptiest bucket of a multi-limit).
    - ``retry_after``: seconds until the same call could be granted; for a
      reservation, seconds until the booked slot.  Never rounded down.
    - ``reset_after``: seconds until every bucket is full again.
    - ``refused_by``: the name of the bucket that refused (longest wait), or None.
    - ``server_time``: the Redis time, in seconds, the decision was made at.
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
class _Bucket:
    """One bucket's name, Redis key and limit."""

    name: str | bytes
    key: str | bytes
    limit: Limit


def _make_bucket(key: object, rate: Any, burst: Any, prefix: object) -> _Bucket:
    name = check_key(key)
    limit = rate if isinstance(rate, Limit) else Limit(rate, burst)
    return _Bucket(name, full_key(check_prefix(prefix), name), limit)


def _join(buckets: Sequence[Any], kind: type) -> tuple[Any, list[_Bucket]]:
    """Check that ``buckets`` can be decided in one script call; (client, parts)."""
    if isinstance(buckets, (str, bytes)) or not buckets:
        raise ValueError(f"buckets must name at least one {kind.__name__}, got {buckets!r}")
    for bucket in buckets:
        if not isinstance(bucket, kind):
            raise TypeError(f"buckets must be {kind.__name__} instances, got {type(bucket).__name__}")
    client = buckets[0].redis
    if any(b.redis is not client for b in buckets):
        raise ValueError("buckets must share one redis client to be decided in one round trip")
    parts: list[_Bucket] = [b.bucket for b in buckets]
    keys = [p.key for p in parts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"buckets must have distinct keys, got {keys!r}")
    return client, parts


def _pause_key(key: str | bytes) -> str | bytes:
    """Where a bucket's pause end is kept (see ``lua/gcra.lua``)."""
    return key + (b":paused" if isinstance(key, bytes) else ":paused")  # type: ignore[operator]


def _latest_pause(markers: Sequence[Any]) -> float:
    ends = [int(m) for m in markers if m is not None and str(m if isinstance(m, str) else m.decode()).isdigit()]
    return max(ends) / 1e6 if ends else 0.0


#: One round trip on the node that holds the keys: its clock and the pause
#: markers.  Used on Redis Cluster, where a keyless TIME in a pipeline would go
#: to any node.
STATUS_SCRIPT = "return {redis.call('TIME'), redis.call('MGET', unpack(KEYS))}"


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a redis-py Redis Cluster client (sync or asyncio)."""
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def _slot(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


def _slot_groups(client: object, buckets: Sequence[_Bucket]) -> list[list[_Bucket]]:
    """The buckets grouped by Redis Cluster slot, in order; one group elsewhere."""
    if not is_cluster(client):
        return [list(buckets)]
    groups: dict[int, list[_Bucket]] = {}
    for bucket in buckets:
        groups.setdefault(_slot(bucket.key), []).append(bucket)
    return list(groups.values())


def _batch_slot(client: object, keys: Sequence[str | bytes]) -> int:
    """Which batch call a decision on ``keys`` can join: its cluster slot, or 0."""
    return _slot(keys[0]) if is_cluster(client) else 0


def _combine(decisions: Sequence[Decision]) -> Decision:
    """One decision from those of several slots (see ``_SyncBuckets._run_split``).

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


class _Buckets:
    """What sync and async buckets share: the buckets, argument checks, replies."""

    _buckets: tuple[_Bucket, ...]

    def _setup(self, buckets: Sequence[_Bucket]) -> None:
        # Everything a decision needs that does not change is computed here
        # once: the hot path only looks things up.
        self._buckets = tuple(buckets)
        self._keys = [b.key for b in self._buckets]
        self._pause_keys = [_pause_key(k) for k in self._keys]
        self._limits = [b.limit for b in self._buckets]
        self._min_burst = min(b.limit.burst for b in self._buckets)
        # This decision's part of a batch call's ARGV after its cost (batch.py).
        self._batch_args = [len(self._limits)] + [v for lim in self._limits for v in (lim.interval_us, lim.tau_us)]
        self._argv: dict[tuple[Mode, int, int], list[int]] = {}

    @property
    def keys(self) -> list[str | bytes]:
        return list(self._keys)

    @property
    def limits(self) -> list[Limit]:
        return list(self._limits)

    @property
    def _label(self) -> str:
        return ",".join(k if isinstance(k, str) else k.decode(errors="replace") for k in self._keys)

    def _cost(self, cost: object) -> int:
        if type(cost) is int and 1 <= cost <= self._min_burst:
            return cost
        return check_cost(cost, self._min_burst)

    def _args(self, mode: Mode, cost: int, limit_us: int = 0) -> list[int]:
        signature = (mode, cost, limit_us)
        args = self._argv.get(signature)
        if args is None:
            args = script_args(self._limits, cost, mode, limit_us)
            if len(self._argv) < 64:  # costs and waits vary; keep the cache small
                self._argv[signature] = args
        return args

    def _decision(self, reply: Sequence[int]) -> Decision:
        granted, refused, wait_us, remaining, reset_us, now_us, recovered = reply
        return Decision(
            allowed=granted == 1,
            remaining=remaining,
            retry_after=wait_us / 1e6,
            reset_after=reset_us / 1e6,
            refused_by=self._buckets[refused - 1].name if refused else None,
            server_time=now_us / 1e6,
            recovered=recovered == 1,
        )


class _SyncBuckets(_Buckets):
    """consume / peek / reserve / pause / reset against a sync redis client."""

    def __init__(self, client: SyncRedis, buckets: Sequence[_Bucket], strategy: Strategy = "script") -> None:
        if strategy not in ("script", "transaction"):
            raise ValueError(f"strategy must be 'script' or 'transaction', got {strategy!r}")
        if not hasattr(client, "register_script"):
            raise TypeError(f"redis must be a redis-py client, got {type(client).__name__}")
        if strategy == "transaction" and not isinstance(client, redis.Redis):
            raise TypeError(f"strategy='transaction' needs a redis.Redis client, got {type(client).__name__}")
        self._redis = client
        self._setup(buckets)
        self.strategy: Strategy = strategy
        self._script = client.register_script(gcra_source())
        self._status_script = client.register_script(STATUS_SCRIPT) if is_cluster(client) else None
        # On Redis Cluster, buckets in different slots cannot share a script
        # call: each slot's buckets are decided in turn (see _run_split).
        groups = _slot_groups(client, buckets)
        self._parts = [_SyncBuckets(client, group, strategy) for group in groups] if len(groups) > 1 else []
        self._batch_slot = _batch_slot(client, self._keys) if strategy == "script" and not self._parts else None

    @property
    def redis(self) -> SyncRedis:
        return self._redis

    def _guard(self, call: Callable[[], _T]) -> _T:
        try:
            return call()
        except UNAVAILABLE as exc:
            raise BackendUnavailable(self._label, exc) from exc

    def _eval(self, keys: list[str | bytes], args: list[int]) -> Any:
        # EVALSHA straight away; the registered Script reloads the source
        # when the server has lost it (SCRIPT FLUSH, restart, failover).
        try:
            return self._redis.evalsha(self._script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self._script(keys=keys, args=args)

    def _run(self, mode: Mode, cost: int, limit_us: int = 0) -> Decision:
        if self._parts:
            return self._run_split(mode, cost, limit_us)
        if self.strategy == "transaction":
            client = cast(redis.Redis, self._redis)  # checked in __init__
            outcome = self._guard(
                lambda: run_transaction(client, self._keys, self._limits, cost, mode, limit_us, self._pause_keys)
            )
            return self._decision(outcome.reply())
        args = self._args(mode, cost, limit_us)
        keys = self._keys + self._pause_keys if mode is Mode.PAUSE else self._keys
        try:
            reply = self._eval(keys, args)
        except UNAVAILABLE as exc:
            raise BackendUnavailable(self._label, exc) from exc
        return self._decision(reply)

    def _run_split(self, mode: Mode, cost: int, limit_us: int) -> Decision:
        """Decide slot by slot: each slot's buckets atomically, in order.

        A refusal in a later slot gives the tokens taken in the earlier ones
        back (``Mode.REFUND``).  Between the two, those tokens were briefly
        unavailable to others: the limit can only err on the safe side.  If
        Redis fails half-way, what was taken stays taken, for the same reason.
        """
        decisions: list[Decision] = []
        for index, part in enumerate(self._parts):
            decision = part._run(mode, cost, limit_us)
            decisions.append(decision)
            if not decision.allowed and mode in (Mode.CONSUME, Mode.RESERVE):
                for earlier in self._parts[:index]:
                    earlier._run(Mode.REFUND, cost)
                break
        return _combine(decisions)

    def consume(self, cost: int = 1) -> Decision:
        """Take ``cost`` tokens now if every bucket has them; otherwise take none."""
        return self._run(Mode.CONSUME, self._cost(cost))

    def peek(self, cost: int = 1) -> Decision:
        """What ``consume(cost)`` would say now, without taking anything."""
        return self._run(Mode.PEEK, self._cost(cost))

    def book(self, cost: int = 1, max_wait: float = DEFAULT_MAX_WAIT) -> Decision:
        """Book the next free slot for ``cost`` tokens, at most ``max_wait`` s ahead.

        Granted: the tokens are taken now (the bucket goes into debt) and
        ``retry_after`` is the wait until the slot; ``server_time +
        retry_after`` is the slot on Redis' clock.  Refused (``allowed`` is
        False): nothing was booked and ``retry_after`` says how far the next
        slot is.
        """
        wait_us = seconds_to_us(check_seconds(max_wait, "max_wait"))
        return self._run(Mode.RESERVE, self._cost(cost), wait_us)

    def reserve(self, cost: int = 1, max_wait: float = DEFAULT_MAX_WAIT) -> float:
        """Book the next free slot and return the seconds to wait for it.

        Waiters are served in booking order, each at its own slot, instead of
        all retrying at once.  Raises ``ReservationRefused`` when the slot is
        further than ``max_wait`` seconds away (nothing is booked then).
        """
        decision = self.book(cost, max_wait)
        if not decision.allowed:
            raise ReservationRefused(self._label, decision.retry_after, max_wait)
        return decision.retry_after

    def pause(self, seconds: float) -> Decision:
        """Admit nothing for ``seconds``, then refill from empty (e.g. after a 429)."""
        pause_us = seconds_to_us(check_seconds(seconds, "seconds"))
        return self._run(Mode.PAUSE, 1, pause_us)

    def reset(self) -> None:
        """Forget the bucket's state: it is full again."""
        self._guard(lambda: self._redis.delete(*self._keys))

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
            statuses = [part.slot_status() for part in self._parts]
            return min(now for now, _ in statuses), max(paused for _, paused in statuses)

        def ask() -> list[Any]:
            if self._status_script is not None:
                return cast(list[Any], self._status_script(keys=self._pause_keys))
            pipe = self._redis.pipeline(transaction=False)
            pipe.time()
            pipe.mget(self._pause_keys)
            return pipe.execute()

        (seconds, micros), markers = self._guard(ask)
        return int(seconds) + int(micros) / 1e6, _latest_pause(markers)


class _OneBucket:
    """What a single bucket (sync or async) adds: its key and limit."""

    bucket: _Bucket

    @property
    def key(self) -> str | bytes:
        """The Redis key holding this bucket's state."""
        return self.bucket.key

    @property
    def limit(self) -> Limit:
        return self.bucket.limit

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.bucket.name!r}, {self.limit})"


class TokenBucket(_OneBucket, _SyncBuckets):
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
        self.bucket = _make_bucket(key, rate, burst, prefix)
        super().__init__(redis, [self.bucket], strategy)


class MultiBucket(_SyncBuckets):
    """Several buckets decided together: granted only if every one can grant.

    ``Decision.refused_by`` names the bucket with the longest wait.  On Redis
    Cluster, buckets whose keys share a hash tag (``{acme}:api``,
    ``{acme}:mail``) are decided in one script call; buckets in different
    slots are decided slot by slot, and tokens taken in one slot are given
    back if a later slot refuses.
    """

    def __init__(self, buckets: Sequence[TokenBucket]) -> None:
        client, parts = _join(buckets, TokenBucket)
        super().__init__(client, parts, buckets[0].strategy)

    def __repr__(self) -> str:
        return f"MultiBucket({', '.join(repr(b.name) for b in self._buckets)})"


class RedisTokenBucket:
    """The original API, kept so existing code runs unchanged.

    >>> bucket = RedisTokenBucket(redis_client, key="api_rate_limit", burst_rate=5, replenishment_rate=1)
    >>> bucket.consume()
    True

    ``burst_rate`` is the bucket's capacity and ``replenishment_rate`` the
    tokens added per second.  The default engine is the Lua script;
    ``strategy="transaction"`` keeps the original WATCH/MULTI/EXEC design
    (corrected to use Redis time and bounded, jittered retries).
    """

    def __init__(
        self,
        redis_client: SyncRedis,
        key: str | bytes,
        burst_rate: int,
        replenishment_rate: str | float | int,
        *,
        strategy: Strategy = "script",
        prefix: str = "throttle",
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
