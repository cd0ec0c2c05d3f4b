"""Argument checks shared by every entry point.

Each check raises ``TypeError`` for the wrong kind of value and ``ValueError``
for the wrong value, and names the parameter and the value it got, so a bad
setting is found at the line that passed it rather than deep in a worker.
"""

from __future__ import annotations

import math

__all__ = ["check_key", "check_cost", "check_seconds", "full_key", "has_hash_tag", "MAX_WAIT_SECONDS"]

#: Longest reservation or pause the bucket accepts (mirrors SANE_DEBT_US).
MAX_WAIT_SECONDS = 86400.0


def check_key(value: object, name: str = "key") -> str | bytes:
    """A bucket name: a non-empty str or bytes (any characters, passed via KEYS)."""
    if isinstance(value, (str, bytes)):
        if not value:
            raise ValueError(f"{name} must not be empty, got {value!r}")
        return value
    raise TypeError(f"{name} must be a str or bytes, got {type(value).__name__} {value!r}")


def check_prefix(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"prefix must be a str, got {type(value).__name__} {value!r}")
    return value


def has_hash_tag(key: str | bytes) -> bool:
    """Whether Redis Cluster would hash ``key`` by a ``{tag}`` inside it."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    return start >= 0 and raw.find(b"}", start + 2) > start


def full_key(prefix: str, name: str | bytes) -> str | bytes:
    """``<prefix>:{<name>}``, the Redis key of bucket ``name``.

    The braces are a Redis Cluster hash tag: a bucket's key and its pause
    marker (``<key>:paused``) land in one slot, and different names spread
    over the shards.  A name that has a tag already keeps it, so buckets meant
    to be decided together can share one (``{acme}:api``, ``{acme}:mail``).
    An empty prefix uses the name exactly as given.  Bytes names stay bytes
    so that non-UTF-8 keys survive.
    """
    if not prefix:
        return name
    if isinstance(name, bytes):
        tagged = name if has_hash_tag(name) else b"{" + name + b"}"
        return prefix.encode() + b":" + tagged
    return f"{prefix}:{name}" if has_hash_tag(name) else f"{prefix}:{{{name}}}"


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
    return math.ceil(seconds * 1_000_000)
