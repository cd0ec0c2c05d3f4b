"""Argument checks shared by every entry point.

Each check raises ``TypeError`` for the wrong kind of value and ``ValueError``
for the wrong value, and names the parameter and the value it got, so a bad
setting is found at the line that passed it rather than deep in a worker.
"""

from __future__ import annotations

import math

from .keys import RESERVED
from .limit import MAX_WAIT_SECONDS, US_PER_S

__all__ = ["check_key", "check_prefix", "check_cost", "check_seconds", "seconds_to_us"]


def check_key(value: object, name: str = "key") -> str | bytes:
    """A bucket name: a non-empty str or bytes (any characters, passed via KEYS).

    Names starting with ``~`` are throttle's own key space (``throttle.keys``).
    """
    if isinstance(value, (str, bytes)):
        if not value:
            raise ValueError(f"{name} must not be empty, got {value!r}")
        first = value[:1].decode(errors="replace") if isinstance(value, bytes) else value[:1]
        if first == RESERVED:
            raise ValueError(f"{name} must not start with {RESERVED!r} (throttle's own keys do), got {value!r}")
        return value
    raise TypeError(f"{name} must be a str or bytes, got {type(value).__name__} {value!r}")


def check_prefix(value: object, name: str = "prefix") -> str:
    """A key prefix: any str ('' means bucket keys exactly as named)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    return value


def check_cost(value: object, burst: int, name: str = "cost") -> int:
    """Tokens one call takes: a whole number from 1 to the burst."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a whole number of tokens, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value) or value != int(value)):
        raise ValueError(f"{name} must be a whole number of tokens, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    if value > burst:
        raise ValueError(f"{name} {value!r} is larger than the burst {burst}: it could never be granted")
    return int(value)


def check_seconds(value: object, name: str, upper: float = MAX_WAIT_SECONDS) -> float:
    """A duration in seconds, 0 <= value <= upper."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__} {value!r}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    if value > upper:
        raise ValueError(f"{name} must be at most {upper:g} seconds, got {value!r}")
    return float(value)


def seconds_to_us(seconds: float) -> int:
    """Seconds to whole microseconds, rounded up (never shorten a wait)."""
    return math.ceil(seconds * US_PER_S)
