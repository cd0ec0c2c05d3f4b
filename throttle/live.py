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
- ``<prefix>:~{live}:pending``    hash  limit -> what stays in force until a change takes effect

``LiveState.in_force`` is the one answer to "what is this limit now?" (the
configured limit, the override over it, its version and pause): the Celery
gate, the CLI and the metrics collector all ask it.

A change bumps the limit's version, and the version is part of its buckets'
names (``api@3``, ``api@3:tenant``): the new limit starts from a fresh bucket
instead of inheriting a queue of slots booked at the old rate, and a task that
comes back at a slot booked under an older version books again.  The price: a
fresh bucket is full, so at most one extra burst passes at the moment of a
change.

A change takes effect ``CHANGE_DELAY_S`` after it is made, at that Redis time
on every worker: workers learn of it within ``REFRESH_S``, and until the
moment comes they keep the limit in force before (``pending``).  So no worker
decides by the old limit while another already decides by the new one: a
decrease never lets the old rate run on anywhere.
Changes of one limit take effect one after the other: a change made while
another is pending waits (at most ``CHANGE_DELAY_S``) until that one is in
force, so every worker goes through the same versions in the same order.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

from redis.exceptions import RedisError

from . import script as scripts
from .keys import LiveKeys
from .limit import MODES, ConcurrencyLimit, Limit, LimitMode, NamedLimit
from .live_state import InForce, LiveState, Override, Pending

__all__ = ["LiveLimits", "LiveState", "InForce", "Override", "Pending", "REFRESH_S", "CHANGE_DELAY_S", "STATE_TTL_S"]

logger = logging.getLogger("throttle")

#: Workers re-read the live state at most this often (seconds).
REFRESH_S = 0.5

#: A change takes effect this long after it is made (longer than REFRESH_S:
#: every worker knows of it before the moment comes).
CHANGE_DELAY_S = 2 * REFRESH_S

#: Versions, pauses and the published config expire this long after their
#: last change (an override stays until ``throttle unset``: it is config).
STATE_TTL_S = 30 * 86400

#: How often ``_change`` waits for an earlier change before giving up (each wait <= CHANGE_DELAY_S).
_CHANGE_ATTEMPTS = 10


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parsed(raw: Mapping[Any, Any], parse: Any) -> dict[str, Any]:
    """A hash's JSON values parsed; entries written by hand and wrong are skipped
    (the configured limit stays)."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        try:
            out[_decode(name)] = parse(value)
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return out


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
        self.pending_key = keys.pending
        self.refresh = refresh
        self._read_script = scripts.register(redis, "live_state")
        self._change_script = scripts.register(redis, "live_change")
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
        # One script call: the clock and the four hashes from the node that
        # holds them (a cluster pipeline would send TIME to any node).
        keys = [self.overrides_key, self.versions_key, self.paused_key, self.pending_key]
        (seconds, micros), *hashes = self._read_script(keys=keys)
        overrides, versions, paused, pending = (dict(zip(h[::2], h[1::2], strict=True)) for h in hashes)
        return LiveState(
            overrides=_parsed(overrides, Override.from_json),
            versions={_decode(k): int(v) for k, v in versions.items()},
            paused_until={_decode(k): int(v) / 1e6 for k, v in paused.items()},
            pending=_parsed(pending, Pending.from_json),
            server_time=int(seconds) + int(micros) / 1e6,
            read_at=time.monotonic(),
        )

    def publish_configured(
        self, limits: Mapping[str, NamedLimit], concurrency: Mapping[str, ConcurrencyLimit] | None = None
    ) -> None:
        """Tell the CLI what the workers' config says (rates, and concurrency limits)."""
        entries: dict[str, dict[str, Any]] = {name: published(nl) for name, nl in limits.items()}
        for name, cl in (concurrency or {}).items():
            entries.setdefault(name, {"per_key": cl.per_key}).update(
                {"concurrency": cl.capacity, "lease_expiry": cl.expiry}
            )
        if not entries:
            return
        mapping = {name: json.dumps(entry) for name, entry in entries.items()}
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
                data = json.loads(raw)
                if isinstance(data, dict) and "rate" not in data and "concurrency" in data:
                    continue  # a concurrency limit only (configured_concurrency)
                out[name] = from_published(name, data)
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("ignoring the published config of %r: %s", name, exc)
        return out

    def configured_concurrency(self) -> dict[str, ConcurrencyLimit]:
        """The concurrency limits the workers published; unreadable entries are skipped."""
        out: dict[str, ConcurrencyLimit] = {}
        for key, raw in self.redis.hgetall(self.configured_key).items():
            name = _decode(key)
            try:
                data = json.loads(raw)
                if isinstance(data, dict) and "concurrency" in data:
                    out[name] = ConcurrencyLimit(
                        name, int(data["concurrency"]), bool(data.get("per_key", True)), float(data["lease_expiry"])
                    )
            except (ValueError, TypeError, KeyError) as exc:
                logger.warning("ignoring the published concurrency of %r: %s", name, exc)
        return out

    def in_force(self, only: str | None = None, scheduled: bool = False) -> dict[str, InForce]:
        """Every known limit (configured or live), or ``only``, as in force now (or once scheduled)."""
        configured = self.configured()
        state = self.read()
        known = set(configured) | state.names() | set(self.configured_concurrency())
        names = [only] if only is not None else sorted(known)
        return {name: state.in_force(name, configured.get(name), scheduled) for name in names}

    def set(
        self,
        name: str,
        rate: str | None = None,
        burst: int | None = None,
        mode: LimitMode | None = None,
        concurrency: int | None = None,
    ) -> int:
        """Override ``name``'s rate, burst, mode and/or concurrency from ``CHANGE_DELAY_S`` on; the new version."""
        if rate is None and burst is None and mode is None and concurrency is None:
            raise ValueError("give at least one of rate, burst, mode, concurrency")
        current = self.read().overrides.get(name, Override())
        # Checked as merged with what is set now (Lua merges it again, atomically).
        Override(
            rate if rate is not None else current.rate,
            burst if burst is not None else current.burst,
            mode if mode is not None else current.mode,
            concurrency if concurrency is not None else current.concurrency,
        )
        fields = (
            "" if rate is None else str(rate),
            "" if burst is None else str(int(burst)),
            mode or "",
            "" if concurrency is None else str(int(concurrency)),
        )
        return self._change(name, "set", *fields)

    def unset(self, name: str) -> bool:
        """Back to the configured limit (from ``CHANGE_DELAY_S`` on); False, and no change, without an override."""
        return self._change(name, "unset") != 0

    def bump(self, name: str) -> int:
        """A new version of ``name`` (from ``CHANGE_DELAY_S`` on): fresh buckets; slots booked before are void."""
        return self._change(name, "bump")

    def _change(self, name: str, op: str, *fields: str) -> int:
        """Schedule a change of ``name`` ``CHANGE_DELAY_S`` ahead; its new version (0: nothing to unset).

        One change at a time: while an earlier change is pending, this waits
        until it has taken effect (at most ``CHANGE_DELAY_S``).  Scheduling a
        second change over a pending one would let a worker whose reading is
        a few hundred ms old switch to the first change while fresher workers
        keep the limit before it: two versions, two buckets, twice the rate.
        """
        args = [name, op, round(CHANGE_DELAY_S * 1e6), STATE_TTL_S, *(fields or ("", "", "", ""))]
        keys = [self.overrides_key, self.versions_key, self.pending_key]
        for _ in range(_CHANGE_ATTEMPTS):
            reply, value = self._change_script(keys=keys, args=args)
            status = _decode(reply)
            if status == "ok":
                return int(value)
            if status == "none":
                return 0
            time.sleep(int(value) / 1e6 + 0.005)  # "wait": until the pending change is in force
        raise RuntimeError(f"limit {name!r}: other changes kept arriving; {op} was not made, try again")

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
