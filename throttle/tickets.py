"""Tickets: a booked slot kept in Redis, redeemed once by whoever waits for it.

A caller that books a slot and waits elsewhere (a deferred Celery task, a
parked job) keeps only a ticket id; the slot ("<slot_us>:<booked_us>", Redis
time) lives at the bucket's ticket key, in the bucket's cluster slot.  At
its slot the caller redeems it (``lua/redeem.lua``): one round trip says go,
wait, or book again (late, paused or reset since the booking, or no ticket
at all), and uses the ticket up.  So a copy of the caller (a retried or
duplicated message, a forged header) never holds a slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from .checks import check_key, check_seconds, seconds_to_us
from .limit import MAX_WAIT_SECONDS, US_PER_S

if TYPE_CHECKING:
    from ._core import ScriptPlan
    from .decision import Decision

__all__ = [
    "Verdict",
    "Redemption",
    "TICKET_SLACK_S",
    "RESET_MARKER_US",
    "ticket_entry",
    "redeem_call",
    "redemption",
    "read_markers",
]

#: A ticket outlives its slot by this much: a task later than that finds no
#: ticket and books again (it would be "late" anyway).
TICKET_SLACK_S = 3600.0

#: Reset markers live as long as any slot booked before them can be ahead.
RESET_MARKER_US = (MAX_WAIT_SECONDS + int(TICKET_SLACK_S)) * US_PER_S


class Verdict(IntEnum):
    """What ``redeem`` says of a ticket (the values are ``lua/redeem.lua``'s)."""

    NONE = 0  # no ticket (never booked, already redeemed, forged, expired): book again
    GO = 1  # the slot has come: run
    EARLY = 2  # the slot is still ahead: wait again (the ticket stays)
    LATE = 3  # too late for the slot: book again
    PAUSED = 4  # a pause began after the booking and ends after the slot: book again
    RESET = 5  # the bucket was reset after the booking: book again


@dataclass(frozen=True)
class Redemption:
    """A ticket redeemed: the verdict, ``wait`` = slot - now in seconds (negative when late)."""

    verdict: Verdict
    wait: float
    server_time: float


def ticket_entry(plan: ScriptPlan, ticket_id: object, decision: Decision) -> tuple[str | bytes, str, int]:
    """(key, value, ttl_ms) of the ticket for a booked ``decision``."""
    if not isinstance(ticket_id, str) or not ticket_id:
        raise ValueError(f"ticket_id must be a non-empty str, got {ticket_id!r}")
    if not decision.allowed:
        raise ValueError("a ticket is for a granted booking; this decision was refused")
    booked = round(decision.server_time * US_PER_S)
    slot = booked + math.ceil(decision.retry_after * US_PER_S)
    ttl_ms = math.ceil((decision.retry_after + TICKET_SLACK_S) * 1000)
    return plan.buckets[0].keys.ticket(ticket_id), f"{slot}:{booked}", ttl_ms


def redeem_call(
    plan: ScriptPlan, ticket_id: str, grace: float, spin: float, outside: tuple[float, float, float]
) -> tuple[list[str | bytes], list[int]]:
    """KEYS and ARGV of ``redeem.lua``; ``outside``: (now, pause end, reset) of other slots."""
    check_key(ticket_id, "ticket_id")
    keys = [plan.buckets[0].keys.ticket(ticket_id), *plan.pause_keys, *plan.reset_keys]
    _, paused, reset = outside
    args = [
        seconds_to_us(check_seconds(grace, "grace")),
        seconds_to_us(check_seconds(spin, "spin")),
        round(paused * US_PER_S),
        round(reset * US_PER_S),
    ]
    return keys, args


def redemption(reply: Sequence[int]) -> Redemption:
    """``redeem.lua``'s reply as a value."""
    verdict, wait_us, now_us = reply
    return Redemption(Verdict(int(verdict)), int(wait_us) / US_PER_S, int(now_us) / US_PER_S)


def read_markers(reply: Sequence[Any], pauses: int) -> tuple[float, float, float]:
    """``slot_status.lua``'s reply over pause then reset markers: (now, latest pause end, latest reset)."""
    (seconds, micros), values = reply
    numbers = [int(v) if v and (v if isinstance(v, str) else v.decode()).isdigit() else 0 for v in values]
    paused, reset = numbers[:pauses], numbers[pauses:]
    return (
        int(seconds) + int(micros) / US_PER_S,
        max(paused, default=0) / US_PER_S,
        max(reset, default=0) / US_PER_S,
    )
