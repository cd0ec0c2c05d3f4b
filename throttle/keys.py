"""The key space: the one place that builds and parses every Redis key.

Two kinds of keys share a prefix (``throttle`` by default):

- **buckets**, named by users: ``<prefix>:{<name>}`` and the bucket's pause
  marker ``<prefix>:{<name>}:paused``.  The braces are a Redis Cluster hash
  tag, so a bucket and its marker share a slot and different names spread
  over the shards; a name with a tag of its own keeps it (``{acme}:api``).
- **throttle's own keys** (live limits, metrics, the reference worker's
  counters), under ``<prefix>:~``.  A bucket key never has ``~`` right after
  the prefix (names starting with ``~`` are refused), so no limit or tenant
  name can land on them: a limit called ``live`` or ``metrics`` is just a
  limit.

Bucket names of a Celery limit: ``<limit>`` as configured, ``<limit>@<version>``
after a live change, and ``<...>:<tenant>`` for a per-key bucket.  Limit names
are ``[A-Za-z0-9_.-]+``, so the ``@`` and the first ``:`` always parse back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "RESERVED",
    "LIMIT_NAME",
    "bucket_key",
    "pause_key",
    "keys_label",
    "bucket_name",
    "limit_of",
    "has_hash_tag",
    "LiveKeys",
    "metrics_key",
    "own_key",
    "stats_key",
]

#: What follows ``<prefix>:`` in throttle's own keys, and what no bucket name may start with.
RESERVED = "~"

#: What a limit's name may be made of (it becomes part of keys and labels).
LIMIT_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def has_hash_tag(key: str | bytes) -> bool:
    """Whether Redis Cluster would hash ``key`` by a ``{tag}`` inside it."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    return start >= 0 and raw.find(b"}", start + 2) > start


def bucket_key(prefix: str, name: str | bytes) -> str | bytes:
    """``<prefix>:{<name>}``, the Redis key of bucket ``name``.

    An empty prefix uses the name exactly as given.  Bytes names stay bytes
    so that non-UTF-8 keys survive.
    """
    if not prefix:
        return name
    if isinstance(name, bytes):
        tagged = name if has_hash_tag(name) else b"{" + name + b"}"
        return prefix.encode() + b":" + tagged
    return f"{prefix}:{name}" if has_hash_tag(name) else f"{prefix}:{{{name}}}"


def pause_key(key: str | bytes) -> str | bytes:
    """Where a bucket's pause end is kept (see ``lua/gcra.lua``): same slot as the bucket."""
    return key + b":paused" if isinstance(key, bytes) else key + ":paused"


def keys_label(keys: Sequence[str | bytes]) -> str:
    """Keys for a message: text, undecodable bytes replaced."""
    return ",".join(k if isinstance(k, str) else k.decode(errors="replace") for k in keys)


def bucket_name(limit: str, version: int = 0, tenant: str | None = None) -> str:
    """The bucket of ``limit`` at live ``version`` (0: as configured), for ``tenant`` if given."""
    name = limit if version == 0 else f"{limit}@{version}"
    return name if tenant is None else f"{name}:{tenant}"


def limit_of(name: str) -> str:
    """The limit a bucket name belongs to: ``api@3:tenant`` -> ``api``."""
    return name.split(":", 1)[0].split("@", 1)[0]


def own_key(prefix: str, *parts: str) -> str:
    """One of throttle's own keys: ``<prefix>:~<parts joined by ':'>``."""
    tail = RESERVED + ":".join(parts)
    return f"{prefix}:{tail}" if prefix else tail


class LiveKeys:
    """The live-limit hashes (see ``throttle.live``), all in one cluster slot."""

    def __init__(self, prefix: str) -> None:
        self.overrides = own_key(prefix, "{live}", "overrides")
        self.versions = own_key(prefix, "{live}", "versions")
        self.paused = own_key(prefix, "{live}", "paused")
        self.configured = own_key(prefix, "{live}", "configured")


def metrics_key(prefix: str, limit: str) -> str:
    """A limit's counters; tagged like the limit's bucket, so they share its shard."""
    return own_key(prefix, "metrics", f"{{{limit}}}")


def stats_key(prefix: str) -> str:
    """The reference worker's demo counters (``worker/stats.py``)."""
    return own_key(prefix, "demo", "stats")
