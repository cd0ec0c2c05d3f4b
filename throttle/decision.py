"""``Decision``: what a bucket said, as a value (sync, asyncio and batch alike)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Decision"]


@dataclass(frozen=True)
class Decision:
    """What the bucket said.  ``bool(decision)`` is ``allowed``.

    - ``remaining``: whole tokens left (in the emptiest bucket of a multi-limit).
    - ``retry_after``: seconds until the same call could be granted; for a
      reservation, seconds until the booked slot.  Never rounded down.
    - ``reset_after``: seconds until every bucket is full again.
    - ``refused_by``: the name of the bucket that refused (longest wait), or None.
    - ``server_time``: the Redis time, in seconds, the decision was made at.
    - ``recovered``: a bucket held a value throttle did not write; it was
      treated as empty (the limit errs on the safe side).
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float
    refused_by: str | bytes | None = None
    server_time: float = 0.0
    recovered: bool = False

    def __bool__(self) -> bool:
        return self.allowed
