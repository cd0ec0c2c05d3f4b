"""The key space: the one place that builds and parses every Redis key.

Two kinds of keys share a prefix (``throttle`` by default):

- **buckets**, named by users: ``<prefix>:{<name>}``.  The braces are a Redis
  Cluster hash tag, so different names spread over the shards; a name with a
  tag of its own keeps it (``{acme}:api``), so buckets meant to be decided
  together can share a slot.
- **throttle's own keys**, under ``<prefix>:~``: a bucket's pause marker,
  reset marker and tickets (``<prefix>:~paused:{<name>}``... : the bucket's
  tag, so its slot), the live limits, the metrics, the reference worker's
  counters.  A bucket key never has ``~`` right after the prefix (names
  starting with ``~`` are refused), so no limit or tenant name can land on
  them: a limit called ``live`` or a tenant called ``x}:paused`` is just a
  name.

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
    "BucketKeys",
    "keys_label",
    "bucket_name",
    "limit_of",
    "has_hash_tag",
    "LiveKeys",
    "RoomKeys",
    "LeaseKeys",
    "rooms_key",
    "room_of",
    "room_of_bucket",
    "metrics_key",
    "own_key",
    "stats_key",
]

#: What follows ``<prefix>:`` in throttle's own keys, and what no bucket name may start with.
RESERVED = "~"

#: What a limit's name may be made of (it becomes part of keys and labels).
LIMIT_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def has_hash_tag(key: str | bytes) -> bool:
    """Whether Redis Cluster hashes ``key`` by a tag: the text between the first
    ``{`` and the first ``}`` after it, when that text is not empty."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    return start >= 0 and raw.find(b"}", start + 1) > start + 1


def _tagged(name: bytes) -> bytes:
    """``name`` with a hash tag: its own, ``{name}``, or (a name that starts
    with ``}``, where ``{name}`` would be an empty tag) a fixed one."""
    if has_hash_tag(name):
        return name
    wrapped = b"{" + name + b"}"
    return wrapped if has_hash_tag(wrapped) else b"{" + RESERVED.encode() + b"}" + name


def _own_twin(prefix: bytes, label: bytes, tail: bytes) -> bytes:
    """``<prefix>:~<label>:<tail>``: one of throttle's own keys, in ``tail``'s slot."""
    tail = tail if has_hash_tag(tail) else b"{" + tail + b"}"
    own = RESERVED.encode() + label + b":" + tail
    return prefix + b":" + own if prefix else own


def _like(raw: bytes, model: str | bytes) -> str | bytes:
    return raw if isinstance(model, bytes) else raw.decode()


class BucketKeys:
    """Every key of one bucket: its state, its pause and reset markers, its tickets.

    On Redis Cluster all of them hash to the bucket's slot, so one script can
    read them together.  An empty prefix keeps the bucket's key exactly as
    named (the original API's keys); bytes names stay bytes so that
    non-UTF-8 keys survive.
    """

    def __init__(self, prefix: str, name: str | bytes) -> None:
        raw = name.encode() if isinstance(name, str) else name
        tail = _tagged(raw) if prefix else raw
        pre = prefix.encode()
        self.bucket = _like(pre + b":" + tail if prefix else tail, name)
        #: The end of the latest pause (Redis us); a slot booked before a pause that ends after it is void.
        self.paused = _like(_own_twin(pre, b"paused", tail), name)
        #: When the bucket was last reset (Redis us); slots booked before it are void.
        self.reset = _like(_own_twin(pre, b"reset", tail), name)
        self._ticket = _own_twin(pre, b"ticket", tail) + b":"
        self._str = isinstance(name, str)

    def ticket(self, ticket_id: str) -> str | bytes:
        """The ticket a deferred task redeems at its booked slot (see ``TokenBucket.book``)."""
        raw = self._ticket + ticket_id.encode()
        return raw.decode() if self._str else raw


def bucket_key(prefix: str, name: str | bytes) -> str | bytes:
    """``<prefix>:{<name>}``, the Redis key of bucket ``name`` (see ``BucketKeys``)."""
    return BucketKeys(prefix, name).bucket


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
        self.pending = own_key(prefix, "{live}", "pending")


class RoomKeys:
    """One waiting room (see ``throttle.room``), all in the room's own cluster slot.

    A room is named like a bucket without its version (``api``,
    ``api:tenant``): parked tasks stay in it across live changes, and
    tenants' rooms spread over the shards like their buckets.
    """

    def __init__(self, prefix: str, room: str) -> None:
        tag = _tagged(room.encode()).decode()
        #: zset: entry (task id) -> when to release it, Redis time in us.
        self.entries = own_key(prefix, "room", tag)
        #: hash: entry -> the parked message.
        self.messages = own_key(prefix, "room", tag, "m")
        #: zset: entry -> when its release claim expires (a releaser that died gives it back).
        self.claims = own_key(prefix, "room", tag, "c")
        #: hash: "version" -> the room's limit version its release times were planned under.
        self.plan = own_key(prefix, "room", tag, "p")
        #: zset: entry -> when it was parked, Redis time in us (the oldest entry's age, for operators).
        self.since = own_key(prefix, "room", tag, "s")
        #: prefix of the markers that tell a released message from a second copy of it.
        self.released = own_key(prefix, "room", tag, "r") + ":"


class LeaseKeys:
    """One concurrency limit's leases (see ``throttle.semaphore``), in its name's cluster slot.

    The slot is the one of the bucket of the same name (``<prefix>:{name}``),
    so a rate and a concurrency limit of one name can be decided by one
    script on Redis Cluster.
    """

    def __init__(self, prefix: str, name: str) -> None:
        tail = _tagged(name.encode())
        pre = prefix.encode()
        #: zset: lease id -> when it expires unless renewed, Redis time in us.
        self.holders = _own_twin(pre, b"lease", tail).decode()
        #: hash: lease id -> "<acquired at, Redis us> <description of the holder>".
        self.about = self.holders + ":h"
        #: zset: waiter -> when it joined the queue, Redis us (first come, first served).
        self.queue = self.holders + ":q"
        #: zset: waiter -> when it stops waiting unless it says so again, Redis us.
        self.waiters = self.holders + ":d"
        #: hash: waiter -> what is handed back with its lease (a message to publish, say).
        self.payloads = self.holders + ":p"
        self._wake = self.holders + ":w:"

    def wake(self, lease_id: str) -> str:
        """The list a waiter blocks on (BLPOP) until it is handed a lease."""
        return self._wake + lease_id


def rooms_key(prefix: str) -> str:
    """The index of rooms: zset room name -> its earliest release (Redis us)."""
    return own_key(prefix, "{rooms}")


def room_of(limit: str, tenant: str | None = None) -> str:
    """The room of ``limit``'s tasks (``tenant``'s, for a per-key limit): a bucket name without version."""
    return bucket_name(limit, 0, tenant)


def room_of_bucket(name: str) -> str:
    """The room of bucket ``name``: ``api@3:tenant`` -> ``api:tenant`` (the version dropped)."""
    head, sep, tenant = name.partition(":")
    return head.split("@", 1)[0] + sep + tenant


def metrics_key(prefix: str, limit: str) -> str:
    """A limit's counters; tagged like the limit's bucket, so they share its shard."""
    return own_key(prefix, "metrics", f"{{{limit}}}")


def stats_key(prefix: str) -> str:
    """The reference worker's demo counters (``worker/stats.py``)."""
    return own_key(prefix, "demo", "stats")
