"""Limits changed at run time, in Redis: overrides, pauses, and what workers run.

Operators change a limit without redeploying: ``throttle set api --rate
20/s``.  The override lives in Redis; every worker process re-reads the live
state at most every ``REFRESH_S`` seconds (one round trip) and uses it for
its next decisions.  The Celery config stays the fallback: removing the
override (``throttle unset``) goes back to it.

Keys (``throttle.keys.LiveKeys``), all under one hash tag so they live in one
Redis Cluster slot, in throttle's own key space where no bucket can land:

- ``<prefix>:~{live}:overrides``  hash  limit -> JSON {"rate", "burst", "mode"}
- ``<prefix>:~{live}:versions``   hash  limit -> how many times it changed
- ``<prefix>:~{live}:paused``     hash  limit -> end of the pause, Redis time in us
- ``<prefix>:~{live}:configured`` hash  limit -> JSON of the limit in the workers' config

``LiveState.in_force`` is the one answer to "what is this limit now?" (the
configured limit, the override over it, its version and pause): the Celery
gate, the CLI and the metrics collector all ask it.

A change bumps the limit's version, and the version is part of its buckets'
names (``api@3``, ``api@3:tenant``): the new limit starts from a fresh bucket
instead of inheriting a queue of slots booked at the old rate, and a task that
comes back at a slot booked under an older version books again.  So an
increase takes effect at once, and a decrease too.  The price: a fresh bucket
is full, so at most one extra burst passes at the moment of a change.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from redis.exceptions import RedisError

from . import script as scripts
from .keys import LiveKeys, bucket_name
from .limit import MODES, Limit, LimitMode, NamedLimit

__all__ = ["LiveLimits", "LiveState", "InForce", "Override", "REFRESH_S", "STATE_TTL_S"]

logger = logging.getLogger("throttle")

#: Workers re-read the live state at most this often (seconds).
REFRESH_S = 0.5

#: Versions, pauses and the published config expire this long after their
#: last change (an override stays until ``throttle unset``: it is config).
STATE_TTL_S = 30 * 86400


@dataclass(frozen=True)
class Override:
    """What an operator set for one limit; None: the configured value."""

    rate: str | None = None
    burst: int | None = None
    mode: LimitMode | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        # Checked like any limit: a bad override never reaches a worker.
        Limit(self.rate or 1, self.burst or 1)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in (("rate", self.rate), ("burst", self.burst), ("mode", self.mode)) if v})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Override:
        data = json.loads(raw)
        return cls(data.get("rate"), data.get("burst"), data.get("mode"))

    def apply(self, limit: Limit | None, mode: LimitMode) -> tuple[Limit, LimitMode]:
        """The effective (limit, mode) over the configured ones (cached: the
        gate asks for every task, the answer changes only with the override).
        With no configured limit, the override's own values (1 where unset)."""
        return _apply(self, limit, mode)


@functools.lru_cache(maxsize=1024)
def _apply(override: Override, limit: Limit | None, mode: LimitMode) -> tuple[Limit, LimitMode]:
    if limit is None:
        limit = Limit(override.rate or 1, override.burst or 1)
    if override.rate is None and override.burst is None:
        return limit, override.mode or mode
    rate: Any = override.rate if override.rate is not None else limit.rate
    return Limit(rate, override.burst if override.burst is not None else limit.burst), override.mode or mode


@dataclass(frozen=True)
class InForce:
    """One limit as the fleet runs it now.

    ``limit`` is None only for a name that neither the config nor an override
    gives a rate (a pause or a version alone).  ``override_error`` says why a
    hand-written override was ignored.
    """

    name: str
    configured: NamedLimit | None
    override: Override | None
    limit: Limit | None
    mode: LimitMode
    per_key: bool
    version: int
    pause_left: float
    override_error: str | None = None

    def bucket(self, tenant: str | None = None) -> str:
        """The bucket this limit decides in now (for ``tenant`` if it is split per key)."""
        return bucket_name(self.name, self.version, tenant if self.per_key else None)


@dataclass(frozen=True)
class LiveState:
    """One reading of the live keys, with the Redis time it was taken at."""

    overrides: Mapping[str, Override] = field(default_factory=dict)
    versions: Mapping[str, int] = field(default_factory=dict)
    paused_until: Mapping[str, float] = field(default_factory=dict)  # Redis time, seconds
    server_time: float = 0.0
    read_at: float = 0.0  # time.monotonic() of the reading

    def now(self) -> float:
        """Redis' clock now, estimated from the reading (no round trip)."""
        return self.server_time + (time.monotonic() - self.read_at)

    def pause_left(self, name: str) -> float:
        until = self.paused_until.get(name)
        return max(0.0, until - self.now()) if until else 0.0

    def names(self) -> set[str]:
        """Every limit the live keys mention."""
        return set(self.overrides) | set(self.versions) | set(self.paused_until)

    def in_force(self, name: str, configured: NamedLimit | None) -> InForce:
        """Limit ``name`` now: ``configured`` (None if no worker has it) with this state over it."""
        override = self.overrides.get(name)
        limit = configured.limit if configured is not None else None
        mode: LimitMode = configured.mode if configured is not None else "enforce"
        error = None
        if override is not None:
            try:
                limit, mode = override.apply(limit, mode)
            except (TypeError, ValueError) as exc:  # checked when set; a hand-written one may be wrong
                error = str(exc)
        return InForce(
            name=name,
            configured=configured,
            override=override,
            limit=limit,
            mode=mode,
            per_key=configured.per_key if configured is not None else False,
            version=self.versions.get(name, 0),
            pause_left=self.pause_left(name),
            override_error=error,
        )


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LiveLimits:
    """Reads (workers) and writes (the ``throttle`` CLI) the live state."""

    def __init__(self, redis: Any, prefix: str, refresh: float = REFRESH_S) -> None:
        self.redis = redis
        self.prefix = prefix
        keys = LiveKeys(prefix)
        self.overrides_key = keys.overrides
        self.versions_key = keys.versions
        self.paused_key = keys.paused
        self.configured_key = keys.configured
        self.refresh = refresh
        self._read_script = scripts.register(redis, "live_state")
        self._state: LiveState | None = None
        self._lock = threading.Lock()

    # Workers ----------------------------------------------------------------

    def state(self) -> LiveState:
        """The live state, read again when older than ``refresh`` seconds.

        If Redis cannot answer, the last reading is kept (the decision that
        follows will meet the same Redis and handle the error).
        """
        state = self._state
        if state is not None and time.monotonic() - state.read_at < self.refresh:
            return state
        with self._lock:
            state = self._state
            if state is not None and time.monotonic() - state.read_at < self.refresh:
                return state
            try:
                state = self.read()
            except (RedisError, ValueError, TypeError):
                if self._state is None:
                    raise
                return self._state
            self._state = state
            return state

    def fall_back(self) -> LiveState:
        """The configured limits only, until the next refresh (after an error)."""
        state = LiveState(read_at=time.monotonic())
        self._state = state
        return state

    def read(self) -> LiveState:
        # One script call: the clock and the three hashes from the node that
        # holds them (a cluster pipeline would send TIME to any node).
        (seconds, micros), *hashes = self._read_script(keys=[self.overrides_key, self.versions_key, self.paused_key])
        overrides, versions, paused = (dict(zip(h[::2], h[1::2], strict=True)) for h in hashes)
        overrides_parsed: dict[str, Override] = {}
        for name, raw in overrides.items():
            try:
                overrides_parsed[_decode(name)] = Override.from_json(raw)
            except (ValueError, TypeError, KeyError):
                continue  # written by hand and wrong: the configured limit stays
        return LiveState(
            overrides=overrides_parsed,
            versions={_decode(k): int(v) for k, v in versions.items()},
            paused_until={_decode(k): int(v) / 1e6 for k, v in paused.items()},
            server_time=int(seconds) + int(micros) / 1e6,
            read_at=time.monotonic(),
        )

    def publish_configured(self, limits: Mapping[str, NamedLimit]) -> None:
        """Tell the CLI what the workers' config says."""
        if not limits:
            return
        mapping = {name: json.dumps(published(nl)) for name, nl in limits.items()}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.configured_key, mapping=mapping)
        pipe.expire(self.configured_key, STATE_TTL_S)
        pipe.execute()

    # Operators --------------------------------------------------------------

    def configured(self) -> dict[str, NamedLimit]:
        """The limits the workers published (``publish_configured``); unreadable entries are skipped."""
        out: dict[str, NamedLimit] = {}
        for key, raw in self.redis.hgetall(self.configured_key).items():
            name = _decode(key)
            try:
                out[name] = from_published(name, json.loads(raw))
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("ignoring the published config of %r: %s", name, exc)
        return out

    def in_force(self, only: str | None = None) -> dict[str, InForce]:
        """Every known limit (configured or live), or ``only``, as in force now."""
        configured = self.configured()
        state = self.read()
        names = [only] if only is not None else sorted(set(configured) | state.names())
        return {name: state.in_force(name, configured.get(name)) for name in names}

    def set(self, name: str, rate: str | None = None, burst: int | None = None, mode: LimitMode | None = None) -> int:
        """Override ``name``'s rate, burst and/or mode; the new version."""
        if rate is None and burst is None and mode is None:
            raise ValueError("give at least one of rate, burst, mode")
        current = self.read().overrides.get(name, Override())
        merged = Override(
            rate if rate is not None else current.rate,
            burst if burst is not None else current.burst,
            mode if mode is not None else current.mode,
        )
        self.redis.hset(self.overrides_key, name, merged.to_json())
        return self.bump(name)

    def unset(self, name: str) -> bool:
        """Back to the configured limit; False if there was no override."""
        removed = self.redis.hdel(self.overrides_key, name)
        self.bump(name)
        return bool(removed)

    def bump(self, name: str) -> int:
        """A new version of ``name``: fresh buckets; slots booked before are void."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.versions_key, name, 1)
        pipe.expire(self.versions_key, STATE_TTL_S)
        return int(pipe.execute()[0])

    def pause(self, name: str, seconds: float) -> float:
        """Admit nothing of ``name`` for ``seconds``; the pause's end (Redis time)."""
        seconds_now, micros = self.redis.time()
        until_us = int(seconds_now) * 1_000_000 + int(micros) + round(seconds * 1_000_000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.paused_key, name, until_us)
        pipe.expire(self.paused_key, STATE_TTL_S)
        pipe.execute()
        return until_us / 1e6

    def resume(self, name: str) -> bool:
        return bool(self.redis.hdel(self.paused_key, name))

    def version(self, name: str) -> int:
        return int(self.redis.hget(self.versions_key, name) or 0)


def published(nl: NamedLimit) -> dict[str, Any]:
    """A configured limit as workers publish it (JSON-ready)."""
    return {"rate": nl.limit.rate, "burst": nl.limit.burst, "per_key": nl.per_key, "mode": nl.mode}


def from_published(name: str, data: Mapping[str, Any]) -> NamedLimit:
    """The inverse of ``published``."""
    mode = data.get("mode", "enforce")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return NamedLimit(name, Limit(data["rate"], data["burst"]), bool(data.get("per_key", True)), cast(LimitMode, mode))
