"""Limits changed at run time, in Redis: overrides, pauses, and what workers run.

Operators change a limit without redeploying: ``throttle set api --rate
20/s``.  The override lives in Redis; every worker process re-reads the live
state at most every ``REFRESH_S`` seconds (one round trip) and uses it for
its next decisions.  The Celery config stays the fallback: removing the
override (``throttle unset``) goes back to it.

Keys, all under one hash tag so they live in one Redis Cluster slot:

- ``<prefix>:{live}:overrides``  hash  limit -> JSON {"rate", "burst", "mode"}
- ``<prefix>:{live}:versions``   hash  limit -> how many times it changed
- ``<prefix>:{live}:paused``     hash  limit -> end of the pause, Redis time in us
- ``<prefix>:{live}:configured`` hash  limit -> JSON of the limit in the workers' config

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
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .limit import Limit

__all__ = ["LiveLimits", "LiveState", "Override", "MODES", "REFRESH_S", "versioned"]

#: Workers re-read the live state at most this often (seconds).
REFRESH_S = 0.5

#: Versions, pauses and the published config expire this long after their
#: last change (an override stays until ``throttle unset``: it is config).
STATE_TTL_S = 30 * 86400

#: "enforce" defers tasks over the limit; "shadow" only counts them.
MODES = ("enforce", "shadow")


#: The live state in one round trip: Redis' clock and the three hashes.
READ_SCRIPT = """
return {redis.call('TIME'), redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3])}
"""


def versioned(name: str, version: int) -> str:
    """The bucket name of limit ``name`` at ``version`` (0: as configured)."""
    return name if version == 0 else f"{name}@{version}"


@dataclass(frozen=True)
class Override:
    """What an operator set for one limit; None: the configured value."""

    rate: str | None = None
    burst: int | None = None
    mode: str | None = None

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

    def apply(self, limit: Limit, mode: str) -> tuple[Limit, str]:
        """The effective (limit, mode) over the configured ones (cached: the
        gate asks for every task, the answer changes only with the override)."""
        return _apply(self, limit, mode)


@functools.lru_cache(maxsize=1024)
def _apply(override: Override, limit: Limit, mode: str) -> tuple[Limit, str]:
    if override.rate is None and override.burst is None:
        return limit, override.mode or mode
    rate: Any = override.rate if override.rate is not None else limit.rate
    return Limit(rate, override.burst if override.burst is not None else limit.burst), override.mode or mode


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


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LiveLimits:
    """Reads (workers) and writes (the ``throttle`` CLI) the live state."""

    def __init__(self, redis: Any, prefix: str, refresh: float = REFRESH_S) -> None:
        self.redis = redis
        self.prefix = prefix
        base = f"{prefix}:{{live}}" if prefix else "{live}"
        self.overrides_key = f"{base}:overrides"
        self.versions_key = f"{base}:versions"
        self.paused_key = f"{base}:paused"
        self.configured_key = f"{base}:configured"
        self.refresh = refresh
        self._read_script = redis.register_script(READ_SCRIPT)
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
            except Exception:
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

    def publish_configured(self, limits: Mapping[str, Any]) -> None:
        """Tell the CLI what the workers' config says (``NamedLimit`` values)."""
        if not limits:
            return
        mapping = {
            name: json.dumps({"rate": nl.limit.rate, "burst": nl.limit.burst, "per_key": nl.per_key, "mode": nl.mode})
            for name, nl in limits.items()
        }
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.configured_key, mapping=mapping)
        pipe.expire(self.configured_key, STATE_TTL_S)
        pipe.execute()

    # Operators --------------------------------------------------------------

    def configured(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(self.configured_key)
        return {_decode(k): json.loads(v) for k, v in raw.items()}

    def set(self, name: str, rate: str | None = None, burst: int | None = None, mode: str | None = None) -> int:
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
