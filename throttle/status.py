"""What an operator sees of a limit: the limit in force and its bucket's tokens now.

``throttle list``, ``inspect``, ``watch`` and the Prometheus collector all
describe limits through ``describe``; the limit in force itself comes from
``throttle.live`` (one owner), this module only adds what its bucket holds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

from redis.exceptions import RedisError

from .bucket import TokenBucket
from .keys import bucket_name, limit_of, room_of
from .limit import ConcurrencyLimit
from .live import InForce, LiveLimits, published
from .metrics import read_metrics, summarise
from .room import WaitingRoom
from .semaphore import Holder, Semaphore, any_lease_name

__all__ = ["LimitStatus", "describe", "bucket_of", "WatchRow", "WatchSampler"]


@dataclass(frozen=True)
class LimitStatus:
    """One limit now.  The bucket fields are None for a limit split per key
    (no one bucket to show) unless a key was asked for."""

    in_force: InForce
    scheduled: InForce | None = None  # what a change already made will bring, while it is pending
    bucket: str | None = None
    tokens: int | None = None
    next_token_in: float | None = None
    full_in: float | None = None
    parked: int = 0  # tasks in the waiting room (the tenant's, with a key)
    next_release_in: float | None = None  # seconds until the room's first release
    last_release_in: float | None = None  # seconds until its last (when the backlog is through)
    oldest_parked_for: float | None = None  # seconds the task parked longest ago has been waiting there
    parked_partial: bool = False  # more rooms than MAX_ROOMS_READ: the figures cover the first due only
    concurrency: int | None = None  # leases at once (a concurrency limit), as in force now
    in_flight: int | None = None  # leases held now (the tenant's, with a key; None for per key without one)
    waiting: int | None = None  # tasks parked for a lease
    holders: tuple[Holder, ...] = ()  # who holds them: lease id (task id.suffix), task, host, pid

    @property
    def name(self) -> str:
        return self.in_force.name

    @property
    def rate(self) -> float | None:
        return self.in_force.limit.rate if self.in_force.limit is not None else None

    @property
    def burst(self) -> int | None:
        return self.in_force.limit.burst if self.in_force.limit is not None else None

    @property
    def source(self) -> str:
        if self.in_force.override is not None:
            return "live override"
        return "config" if self.in_force.configured is not None else "unknown"

    def as_json(self) -> dict[str, Any]:
        """The JSON ``throttle list/inspect --json`` print for this limit."""
        f = self.in_force
        info: dict[str, Any] = {
            "configured": published(f.configured) if f.configured is not None else None,
            "override": json.loads(f.override.to_json()) if f.override is not None else None,
            "rate": self.rate,
            "burst": self.burst,
            "mode": f.mode,
            "per_key": f.per_key,
            "version": f.version,
            "pause_left": round(f.pause_left, 3),
            "bucket": self.bucket,
            "tokens": self.tokens,
            "parked": self.parked,
        }
        if self.parked:
            info["next_release_in"] = self.next_release_in
            info["last_release_in"] = self.last_release_in
            info["oldest_parked_for"] = self.oldest_parked_for
            info["parked_partial"] = self.parked_partial
        if self.bucket is not None:
            info["next_token_in"] = self.next_token_in
            info["full_in"] = self.full_in
        if self.concurrency is not None:
            info["concurrency"] = self.concurrency
            info["in_flight"] = self.in_flight
            info["waiting"] = self.waiting
            info["holders"] = [
                {"lease": h.lease_id, "holder": h.description, "held_for": round(h.held_for, 3),
                 "expires_in": round(h.expires_in, 3)}
                for h in self.holders
            ]  # fmt: skip
        if self.scheduled is not None and f.change_in > 0:
            then = self.scheduled
            info["scheduled"] = {
                "in": round(f.change_in, 3),
                "rate": then.limit.rate if then.limit is not None else None,
                "burst": then.limit.burst if then.limit is not None else None,
                "mode": then.mode,
                "version": then.version,
            }
        return info


def describe(
    client: Any, prefix: str, only: str | None = None, key: str | None = None, scheduled: bool = False
) -> dict[str, LimitStatus]:
    """Every known limit (or ``only``) with its bucket's tokens (``key``: that tenant's);
    ``scheduled``: as it will be once the live changes made so far take effect."""
    live = LiveLimits(client, prefix)
    now, then = live.in_force(only, scheduled), live.in_force(only, scheduled=True)
    parked = _parked(client, prefix, list(now), key)
    concurrency = live.configured_concurrency()
    return {
        name: replace(
            _status(client, prefix, f, key),
            scheduled=then.get(name),
            **parked.get(name, {}),
            **_leases(client, prefix, f, concurrency.get(name), key),
        )
        for name, f in now.items()
    }


def _leases(
    client: Any, prefix: str, in_force: InForce, configured: ConcurrencyLimit | None, key: str | None
) -> dict[str, Any]:
    """A concurrency limit's leases now: capacity, held, parked tasks, holders (nothing for a rate limit).

    A look only: this call hands no lease over (an operator's command could
    not publish the parked task it went to).
    """
    capacity = in_force.concurrency or (configured.capacity if configured is not None else None)
    if capacity is None:
        return {}
    # Without a key: the limit's own leases (those of tasks that give no key).
    per_key = configured.per_key if configured is not None else False
    name = in_force.name if key is None or not per_key else f"{in_force.name}:{key}"
    look = _Look(client, name, capacity, prefix=prefix)
    reply, holders = look.look()
    return {"concurrency": capacity, "in_flight": reply.held, "waiting": reply.queued, "holders": tuple(holders)}


class _Look(Semaphore):
    """A limit's semaphore as operators look at it: any lease name; Redis errors as they are (the CLI reports them)."""

    _check_name = staticmethod(any_lease_name)

    def _unavailable(self, exc: RedisError) -> BaseException:
        return exc


#: ``list``, ``watch`` and a Prometheus scrape read at most this many rooms
#: (the first due): a per-tenant limit may have a room per tenant, and an
#: operator's command must not read 100,000 of them every second.
MAX_ROOMS_READ = 1000


def _parked(client: Any, prefix: str, names: list[str], key: str | None) -> dict[str, dict[str, Any]]:
    """Per limit: tasks in its waiting rooms (``key``: that tenant's room) and when they are released."""
    room = WaitingRoom(client, prefix)
    partial = False
    if key is not None and names:
        rooms = [room_of(names[0], key)]
    else:
        rooms, total = room.rooms_due_first(MAX_ROOMS_READ)
        partial = total > len(rooms)
    stats = room.stats(rooms)
    if not stats:
        return {}
    seconds, micros = client.time()
    now = int(seconds) + int(micros) / 1e6
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [s for s in stats if limit_of(s.room) == name]
        firsts = [s.next_at for s in mine if s.next_at is not None]
        lasts = [s.last_at for s in mine if s.last_at is not None]
        olds = [s.oldest_at for s in mine if s.oldest_at is not None]
        out[name] = {
            "parked": sum(s.parked + s.claimed for s in mine),
            "next_release_in": round(max(0.0, min(firsts) - now), 3) if firsts else None,
            "last_release_in": round(max(0.0, max(lasts) - now), 3) if lasts else None,
            "oldest_parked_for": round(max(0.0, now - min(olds)), 3) if olds else None,
            "parked_partial": partial,
        }
    return out


def bucket_of(in_force: InForce, key: str | None) -> str | None:
    """The bucket to show: the tenant's when ``key`` is given, the limit's when it is not split."""
    if in_force.limit is None or (key is None and in_force.per_key):
        return None
    # An operator's --key names the tenant's bucket whatever per_key says.
    return bucket_name(in_force.name, in_force.version, key)


def _status(client: Any, prefix: str, in_force: InForce, key: str | None) -> LimitStatus:
    name = bucket_of(in_force, key)
    if name is None or in_force.limit is None:
        return LimitStatus(in_force)
    bucket = TokenBucket(client, name, rate=in_force.limit, prefix=prefix)
    decision = bucket.peek()
    return LimitStatus(
        in_force,
        bucket=bucket.key if isinstance(bucket.key, str) else bucket.key.decode(errors="replace"),
        tokens=decision.remaining,
        next_token_in=round(decision.retry_after, 6),
        full_in=round(decision.reset_after, 6),
    )


@dataclass(frozen=True)
class WatchRow:
    """One limit between two samples of ``throttle watch`` (rates per second)."""

    admitted_per_s: float
    deferred_per_s: float
    shadow_refused_per_s: float
    mean_wait_s: float
    tokens: int | None
    rate: float | None
    burst: int | None
    mode: str
    pause_left: float
    admitted_total: float
    deferred_total: float
    parked: int = 0
    concurrency: int | None = None  # a concurrency limit: leases allowed, held, tasks parked for one
    in_flight: int | None = None
    lease_waiting: int | None = None


class WatchSampler:
    """Rates from the fleet's counters: each ``sample`` compares with the one before."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.previous: dict[str, dict[str, float]] = {}
        self.previous_at = time.monotonic()

    def sample(self) -> dict[str, WatchRow]:
        described = describe(self.client, self.prefix)
        counters = {n: summarise(m) for n, m in read_metrics(self.client, self.prefix, described).items()}
        now = time.monotonic()
        elapsed = max(1e-6, now - self.previous_at)
        rows: dict[str, WatchRow] = {}
        for name, status in described.items():
            cur, old = counters[name], self.previous.get(name, counters[name])
            waited = cur["wait_count"] - old["wait_count"]
            rows[name] = WatchRow(
                admitted_per_s=(cur["admitted"] - old["admitted"]) / elapsed,
                deferred_per_s=(cur["deferred"] - old["deferred"]) / elapsed,
                shadow_refused_per_s=(cur["shadow_refused"] - old["shadow_refused"]) / elapsed,
                mean_wait_s=(cur["wait_sum"] - old["wait_sum"]) / waited if waited else 0.0,
                tokens=status.tokens,
                rate=status.rate,
                burst=status.burst,
                mode=status.in_force.mode,
                pause_left=round(status.in_force.pause_left, 3),
                admitted_total=cur["admitted"],
                deferred_total=cur["deferred"],
                parked=status.parked,
                concurrency=status.concurrency,
                in_flight=status.in_flight,
                lease_waiting=status.waiting,
            )
        self.previous, self.previous_at = counters, now
        return rows
