"""Rates and limits: the one place where user input becomes numbers.

Everything downstream (the Lua script, the transaction engine, the Celery gate)
works in integer microseconds.  This module turns "10/s", "100/m", 2.5 and a
burst into an emission interval and a burst tolerance in microseconds, and
rejects anything that cannot be a limit with an error naming the parameter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

__all__ = [
    "Limit",
    "NamedLimit",
    "LimitMode",
    "MODES",
    "parse_rate",
    "MAX_RATE",
    "MAX_BUCKET_SECONDS",
    "MAX_WAIT_SECONDS",
    "ConcurrencyLimit",
    "DEFAULT_LEASE_EXPIRY_S",
]

US_PER_S = 1_000_000

#: Redis time has microsecond resolution; one token per microsecond is the
#: finest emission interval the bucket can represent.
MAX_RATE = 1_000_000.0

#: Longest time a bucket may take to refill from empty (burst / rate).  Keeps
#: every timestamp the script handles far below 2**53 microseconds, where Lua's
#: doubles stop being exact integers.  Ten years is beyond any real limit.
MAX_BUCKET_SECONDS = 10 * 365 * 86400

#: Longest reservation or pause: 30 days (a backlog of 200,000 calls at
#: 5,000/h books 40 hours ahead; a Retry-After may say days).  The script
#: treats a stored TAT further than tau plus this from now as corrupted (its
#: SANE_DEBT_US); Redis time plus this stays far below 2**53 microseconds.
MAX_WAIT_SECONDS = 30 * 86400

#: "enforce" defers tasks over the limit; "shadow" only counts and logs them.
LimitMode = Literal["enforce", "shadow"]
MODES: tuple[LimitMode, ...] = ("enforce", "shadow")

_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
}

_RATE_RE = re.compile(r"^\s*(?P<count>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*(?P<unit>[a-zA-Z]+))?\s*$")


def _check_number(name: str, value: object) -> float:
    """Return ``value`` as a finite positive float, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise TypeError(f"{name} must be a number or a rate string like '10/s', got {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if number <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value!r}")
    return number


def _exact_rate(value: object, name: str = "rate") -> Fraction:
    """Parse a rate into an exact fraction of tokens per second.

    Exact arithmetic matters: "100/m" is 5/3 tokens per second, and the
    emission interval must be exactly 600000 us, not 599999 from a float.
    """
    if isinstance(value, str):
        match = _RATE_RE.match(value)
        if match is None:
            raise ValueError(f"{name} {value!r} is not a rate: use a number per second or 'N/s', 'N/m', 'N/h'")
        unit = (match.group("unit") or "s").lower()
        if unit not in _UNITS:
            raise ValueError(f"{name} {value!r} has unknown unit {unit!r}: use s, m or h")
        count = Fraction(match.group("count"))
        if count <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value!r}")
        exact = count / _UNITS[unit]
    else:
        exact = Fraction(_check_number(name, value)).limit_denominator(US_PER_S)
        if exact <= 0:
            raise ValueError(f"{name} must be greater than zero, got {value!r}")
    if exact > MAX_RATE:
        raise ValueError(f"{name} {value!r} is above {MAX_RATE:.0f} per second, the finest rate Redis time resolves")
    return exact


def parse_rate(value: str | float | int) -> float:
    """Tokens per second from a number or a Celery-style string.

    >>> parse_rate("10/s"), parse_rate("120/m"), parse_rate("0.5/s"), parse_rate(2.5)
    (10.0, 2.0, 0.5, 2.5)
    """
    return float(_exact_rate(value))


def _check_burst(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"burst must be a whole number of tokens, got {value!r}")
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        raise ValueError(f"burst must be a finite whole number, got {value!r}")
    if value != int(value):
        raise ValueError(f"burst must be a whole number of tokens, got {value!r}")
    if value < 1:
        raise ValueError(f"burst must be at least 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Limit:
    """A token bucket's shape: ``rate`` tokens per second, ``burst`` tokens deep.

    Over any interval of ``t`` seconds the bucket admits at most
    ``burst + rate * t`` tokens.  ``rate`` may be given as a number per second
    or a string such as ``"10/s"``, ``"100/m"`` or ``"5/h"``.
    """

    rate: float
    burst: int = 1
    interval_us: int = field(init=False, repr=False, compare=False)
    tau_us: int = field(init=False, repr=False, compare=False)

    def __init__(self, rate: str | float | int, burst: int = 1) -> None:
        exact = _exact_rate(rate)
        checked_burst = _check_burst(burst)
        # Round the emission interval up: a bucket that is 1 us slow per token
        # is safe, one that is 1 us fast over-admits.
        interval_us = math.ceil(US_PER_S / exact)
        if Fraction(US_PER_S, interval_us) < exact * Fraction(99, 100):
            # Above 10,000/s a whole number of microseconds per token may be
            # far from the rate asked (999,999/s would run at 500,000/s):
            # refuse rather than quietly run another limit.
            below, above = US_PER_S / interval_us, US_PER_S / (interval_us - 1)
            raise ValueError(
                f"rate {rate!r} cannot be kept within 1% with a whole number of microseconds per token; "
                f"the nearest rates that can are {below:.10g}/s and {above:.10g}/s"
            )
        if interval_us * checked_burst > MAX_BUCKET_SECONDS * US_PER_S:
            raise ValueError(
                f"burst {checked_burst} at rate {rate!r} takes longer than {MAX_BUCKET_SECONDS} s to refill"
            )
        object.__setattr__(self, "rate", float(exact))
        object.__setattr__(self, "burst", checked_burst)
        object.__setattr__(self, "interval_us", interval_us)
        object.__setattr__(self, "tau_us", interval_us * checked_burst)

    def __str__(self) -> str:
        return f"{self.rate:g}/s burst {self.burst}"


@dataclass(frozen=True)
class NamedLimit:
    """A limit with a name: the bucket every task naming it shares.

    ``per_key``: when a task gives ``throttle_key``, this limit is split into
    one bucket per key (True, the default) or stays one bucket for all keys
    (False: a global quota decided together with per-tenant ones).
    ``mode``: "enforce" (the default) defers tasks over the limit; "shadow"
    only counts and logs them, so a new limit can be tried in production.
    """

    name: str
    limit: Limit
    per_key: bool = True
    mode: LimitMode = "enforce"


#: A task's lease expires this long after its last renewal (renewed every
#: third of it while the body runs): how long a SIGKILLed or frozen worker
#: keeps its leases at most.  A task with a hard ``time_limit`` uses at most
#: that plus ``LEASE_TIME_LIMIT_MARGIN_S``.
DEFAULT_LEASE_EXPIRY_S = 60.0


@dataclass(frozen=True)
class ConcurrencyLimit:
    """At most ``capacity`` bodies of the tasks naming ``name`` run at once, fleet-wide.

    ``per_key``: one such limit per ``throttle_key`` (True, the default), or
    one for all keys.  ``expiry``: how long a lease outlives its last renewal.
    """

    name: str
    capacity: int
    per_key: bool = True
    expiry: float = DEFAULT_LEASE_EXPIRY_S

    def lease_name(self, tenant: str | None) -> str:
        """The semaphore of this limit (``tenant``'s, if split per key): named like its bucket."""
        return self.name if tenant is None or not self.per_key else f"{self.name}:{tenant}"
