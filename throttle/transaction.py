"""The original engine: optimistic WATCH / GET / MULTI / SET / EXEC.

Kept as ``strategy="transaction"`` because it is the design users know and the
benchmark's point of comparison.  Two flaws of the original are fixed: the
clock is the Redis server's (``TIME``), not the client's ``time.time()``, and a
lost race is retried a bounded number of times with jittered backoff instead
of forever.  It stores the same value as the Lua script (the TAT), so the two
engines can share a bucket during a migration.

It costs four round trips per decision (WATCH, GET, TIME, MULTI..EXEC) and
every concurrent writer on the same key forces the others to start again,
which is why the script is the default.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence

import redis
import redis.exceptions

from .errors import Contention
from .gcra import Mode, Outcome, decide
from .keys import keys_label
from .limit import Limit

__all__ = ["run_transaction", "MAX_ATTEMPTS"]

MAX_ATTEMPTS = 50
_BACKOFF_BASE_S = 0.0005
_BACKOFF_CAP_S = 0.02


# Stands for "a value of another type": never parses as a number, so the
# algorithm treats it as corrupted, exactly as the script treats WRONGTYPE.
_WRONG_TYPE = b"<wrong type>"


def _get(pipe: redis.client.Pipeline, key: str | bytes) -> bytes | str | None:
    try:
        value: bytes | str | None = pipe.get(key)
    except redis.exceptions.ResponseError as exc:
        if "WRONGTYPE" not in str(exc):
            raise
        return _WRONG_TYPE
    return value


def run_transaction(
    client: redis.Redis,
    keys: Sequence[str | bytes],
    limits: Sequence[Limit],
    cost: int,
    mode: Mode,
    limit_us: int = 0,
    pause_keys: Sequence[str | bytes] = (),
    max_attempts: int = MAX_ATTEMPTS,
) -> Outcome:
    """One decision with WATCH/MULTI/EXEC; raises ``Contention`` after ``max_attempts``."""
    with client.pipeline(transaction=True) as pipe:
        for attempt in range(max_attempts):
            try:
                pipe.watch(*keys)  # type: ignore[no-untyped-call]
                raws = [_get(pipe, key) for key in keys]
                seconds, micros = pipe.time()
                now = int(seconds) * 1_000_000 + int(micros)
                outcome = decide(raws, now, limits, cost, mode, limit_us)
                pipe.multi()
                for key, write in zip(keys, outcome.writes, strict=True):
                    if write is not None:
                        tat, ttl_ms = write
                        pipe.set(key, str(tat), px=ttl_ms)
                if mode is Mode.PAUSE:
                    for marker, limit in zip(pause_keys, limits, strict=False):
                        ttl_ms = math.ceil(limit_us / 1000) + math.ceil(limit.tau_us / 1000)
                        pipe.set(marker, str(now + limit_us), px=ttl_ms)
                pipe.execute()
                return outcome
            except redis.exceptions.WatchError:
                # "Full jitter" backoff: spread the losers out so they stop
                # colliding, capped so a waiter never sleeps long.
                time.sleep(random.uniform(0, min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2**attempt)))
            finally:
                pipe.reset()
    raise Contention(keys_label(keys), max_attempts)
