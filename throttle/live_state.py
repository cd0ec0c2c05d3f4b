"""The limit in force now, as values computed from one reading of the live keys.

``LiveState`` is one reading (overrides, versions, pauses, pending changes,
the Redis time); ``LiveState.in_force`` answers "what is this limit now?"
as an ``InForce`` for the Celery gate, the CLI and the metrics collector
alike.  Reading and writing the keys is ``throttle.live``'s job.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .keys import bucket_name
from .limit import MODES, Limit, LimitMode, NamedLimit

__all__ = ["Override", "Pending", "LiveState", "InForce"]


@dataclass(frozen=True)
class Override:
    """What an operator set for one limit; None: the configured value."""

    rate: str | None = None
    burst: int | None = None
    mode: LimitMode | None = None
    #: A concurrency limit's capacity (leases held at once).
    concurrency: int | None = None

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        c = self.concurrency
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 1_000_000):
            raise ValueError(f"concurrency must be a whole number from 1 to 1000000, got {c!r}")
        # Checked like any limit: a bad override never reaches a worker.
        Limit(self.rate or 1, self.burst or 1)

    def to_json(self) -> str:
        fields = (("rate", self.rate), ("burst", self.burst), ("mode", self.mode), ("concurrency", self.concurrency))
        return json.dumps({k: v for k, v in fields if v})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Override:
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Override:
        return cls(data.get("rate"), data.get("burst"), data.get("mode"), data.get("concurrency"))

    @property
    def shapes_rate(self) -> bool:
        """Whether it says anything of a rate (not only a concurrency)."""
        return self.rate is not None or self.burst is not None

    def apply(self, limit: Limit | None, mode: LimitMode) -> tuple[Limit, LimitMode]:
        """The effective (limit, mode) over the configured ones (cached: the
        gate asks for every task, the answer changes only with the override).
        With no configured limit, the override's own values (1 where unset)."""
        return _apply(self, limit, mode)


@functools.lru_cache(maxsize=1024)
def _apply(override: Override, limit: Limit | None, mode: LimitMode) -> tuple[Limit, LimitMode]:
    if limit is None:
        limit = Limit(override.rate or 1, override.burst or 1)
    if override.rate is None and override.burst is None:
        return limit, override.mode or mode
    rate: Any = override.rate if override.rate is not None else limit.rate
    return Limit(rate, override.burst if override.burst is not None else limit.burst), override.mode or mode


@dataclass(frozen=True)
class InForce:
    """One limit as the fleet runs it now.

    ``limit`` is None only for a name that neither the config nor an override
    gives a rate (a pause or a version alone).  ``override_error`` says why a
    hand-written override was ignored.
    """

    name: str
    configured: NamedLimit | None
    override: Override | None
    limit: Limit | None
    mode: LimitMode
    per_key: bool
    version: int
    pause_left: float
    override_error: str | None = None
    #: An operator's concurrency (``throttle set NAME --concurrency N``); None: as configured.
    concurrency: int | None = None
    change_in: float = 0.0  # seconds until a change already made takes effect (0: none pending)

    def bucket(self, tenant: str | None = None) -> str:
        """The bucket this limit decides in now (for ``tenant`` if it is split per key)."""
        return bucket_name(self.name, self.version, tenant if self.per_key else None)


@dataclass(frozen=True)
class Pending:
    """Until ``at`` (Redis time, seconds), the limit stays at ``version`` with ``override``."""

    at: float
    version: int
    override: Override | None

    def to_json(self) -> str:
        override = json.loads(self.override.to_json()) if self.override is not None else None
        return json.dumps({"at": round(self.at * 1e6), "version": self.version, "override": override})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Pending:
        data = json.loads(raw)
        override = data.get("override")
        return cls(
            int(data["at"]) / 1e6,
            int(data["version"]),
            None if override is None else Override.from_dict(override),
        )


@dataclass(frozen=True)
class LiveState:
    """One reading of the live keys, with the Redis time it was taken at."""

    overrides: Mapping[str, Override] = field(default_factory=dict)
    versions: Mapping[str, int] = field(default_factory=dict)
    paused_until: Mapping[str, float] = field(default_factory=dict)  # Redis time, seconds
    pending: Mapping[str, Pending] = field(default_factory=dict)
    server_time: float = 0.0
    read_at: float = 0.0  # time.monotonic() of the reading

    def now(self) -> float:
        """Redis' clock now, estimated from the reading (no round trip)."""
        return self.server_time + (time.monotonic() - self.read_at)

    def pause_left(self, name: str, at: float | None = None) -> float:
        until = self.paused_until.get(name)
        return max(0.0, until - (self.now() if at is None else at)) if until else 0.0

    def names(self) -> set[str]:
        """Every limit the live keys mention."""
        return set(self.overrides) | set(self.versions) | set(self.paused_until)

    def in_force(
        self, name: str, configured: NamedLimit | None, scheduled: bool = False, at: float | None = None
    ) -> InForce:
        """Limit ``name`` now: ``configured`` (None if no worker has it) with this state over it.

        ``scheduled``: as it will be once the changes made so far take effect.
        ``at``: at that Redis time instead of now (estimated from the reading,
        which lags when the process was descheduled after it: a decision's
        own Redis time says which version it was really made under).
        """
        now = self.now() if at is None else at
        override, version = self.overrides.get(name), self.versions.get(name, 0)
        pending = self.pending.get(name)
        change_in = max(0.0, pending.at - now) if pending is not None else 0.0
        if pending is not None and change_in > 0 and not scheduled:
            override, version = pending.override, pending.version
        limit = configured.limit if configured is not None else None
        mode: LimitMode = configured.mode if configured is not None else "enforce"
        error = None
        if override is not None and (limit is not None or override.shapes_rate):
            try:
                limit, mode = override.apply(limit, mode)
            except (TypeError, ValueError) as exc:  # checked when set; a hand-written one may be wrong
                error = str(exc)
        return InForce(
            name=name,
            configured=configured,
            override=override,
            limit=limit,
            mode=mode,
            per_key=configured.per_key if configured is not None else False,
            version=version,
            pause_left=self.pause_left(name, now),
            override_error=error,
            change_in=change_in,
            concurrency=override.concurrency if override is not None else None,
        )
