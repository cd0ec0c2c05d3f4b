"""The bucket algorithm in Python: the same decision ``lua/gcra.lua`` makes.

The Lua script is what runs in production.  This twin exists for the
``transaction`` engine (WATCH/MULTI/EXEC computes on the client) and as an
executable specification the tests compare the script against.  Keep the two
in step: the property test in ``tests/test_gcra.py`` fails when they drift.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from .limit import MAX_WAIT_SECONDS, US_PER_S, Limit

__all__ = ["Mode", "Outcome", "decide", "SANE_DEBT_US"]

#: Mirrors SANE_DEBT_US in the script: a TAT further than tau plus this from
#: now was not written by throttle (the longest reservation or pause).
SANE_DEBT_US = MAX_WAIT_SECONDS * US_PER_S


class Mode(IntEnum):
    """What the script is asked to do; the values are its ARGV[1]."""

    PEEK = 0
    CONSUME = 1
    RESERVE = 2
    PAUSE = 3
    REFUND = 4  # give back tokens taken by a multi-slot decision refused later
    BATCH = 5  # many independent decisions in one call (throttle.batch)
    RESET = 6  # forget the buckets; void the slots booked in them


@dataclass(frozen=True)
class Outcome:
    """One decision in integer microseconds, exactly as the script returns it."""

    granted: bool
    refused_index: int  # 1-based, 0 when granted
    wait_us: int
    remaining: int
    reset_us: int
    now_us: int
    recovered: bool
    writes: tuple[tuple[int, int] | None, ...] = ()  # per bucket: (tat, ttl_ms) to store, or None

    def reply(self) -> tuple[int, int, int, int, int, int, int]:
        """The script's reply for this outcome."""
        return (
            int(self.granted),
            self.refused_index,
            self.wait_us,
            self.remaining,
            self.reset_us,
            self.now_us,
            int(self.recovered),
        )

    @classmethod
    def from_reply(cls, reply: Sequence[int]) -> Outcome:
        granted, refused, wait_us, remaining, reset_us, now_us, recovered = (int(v) for v in reply)
        return cls(bool(granted), refused, wait_us, remaining, reset_us, now_us, bool(recovered))


#: What the script writes (string.format '%.0f'): whole decimal microseconds.
_DIGITS = re.compile(rb"^[0-9]+$")


def _stored_tat(raw: str | bytes | None, now: int, tau: int) -> tuple[int, bool]:
    """Parse a stored TAT like the script does; (tat, corrupt).  Absent or past means a full bucket."""
    if raw is None:
        return now, False
    data = raw.encode() if isinstance(raw, str) else raw
    if not isinstance(data, bytes) or not _DIGITS.match(data):
        return now + tau, True
    value = int(data)
    if value > now + tau + SANE_DEBT_US:
        return now + tau, True
    if value <= now:
        return now, False
    return int(value), False


def decide(
    raws: Sequence[str | bytes | None],
    now: int,
    limits: Sequence[Limit],
    cost: int,
    mode: Mode,
    limit_us: int = 0,
) -> Outcome:
    """Decide ``cost`` tokens against every bucket at once; see ``lua/gcra.lua``."""
    tats: list[int] = []
    new_tats: list[int] = []
    corrupt: list[bool] = []
    granted = True
    refused = 0
    wait = 0
    longest_refusal = -1
    for i, (raw, limit) in enumerate(zip(raws, limits, strict=True), start=1):
        interval, tau = limit.interval_us, limit.tau_us
        tat, bad = _stored_tat(raw, now, tau)
        tats.append(tat)
        corrupt.append(bad)
        if mode is Mode.PAUSE:
            new_tat = max(tat, now + limit_us + tau - interval)
            bucket_wait = new_tat - tau + interval - now
        elif mode is Mode.REFUND:
            new_tat = max(now, tat - cost * interval)
            bucket_wait = 0
        else:
            new_tat = tat + cost * interval
            bucket_wait = new_tat - tau - now
        bucket_wait = max(0, bucket_wait)
        new_tats.append(new_tat)
        if mode is Mode.RESERVE:
            ok = bucket_wait <= limit_us
        elif mode in (Mode.PAUSE, Mode.REFUND):
            ok = True
        else:
            ok = bucket_wait == 0
        if not ok:
            granted = False
            if bucket_wait > longest_refusal:
                longest_refusal, refused = bucket_wait, i
        wait = max(wait, bucket_wait)

    write = granted and mode is not Mode.PEEK
    remaining = -1
    reset = 0
    writes: list[tuple[int, int] | None] = []
    for i, limit in enumerate(limits):
        tat = new_tats[i] if write else tats[i]
        if write or (corrupt[i] and mode is not Mode.PEEK):
            writes.append((tat, max(1, math.ceil((tat - now) / 1000))))
        else:
            writes.append(None)
        tokens = max(0, (limit.tau_us - (tat - now)) // limit.interval_us)
        remaining = tokens if remaining < 0 else min(remaining, tokens)
        reset = max(reset, tat - now)
    if not granted:
        wait = longest_refusal
    return Outcome(granted, refused, wait, remaining, reset, now, any(corrupt), tuple(writes))
