"""Counting events in time windows: how tests, the demo and the mock API check a limit.

A limit of ``rate`` per second with ``burst`` promises at most
``burst + rate * (w + epsilon)`` body starts in any window of ``w`` seconds
(``throttle.celery.EPSILON_S``); these helpers measure what actually
happened from recorded times, and ``violations`` checks the promise on every
window, across live changes of the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["peak_in_window", "per_second", "Segment", "Violation", "allowed_in", "violations", "InFlight", "in_flight"]


def peak_in_window(times: Sequence[float], window: float = 1.0) -> int:
    """The most events in any half-open window of ``window`` seconds."""
    ordered = sorted(times)
    best = lo = 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def per_second(times: Sequence[float], start: float) -> list[int]:
    """Counts per whole second since ``start``."""
    if not times:
        return []
    counts = [0] * (int(max(times) - start) + 1)
    for t in times:
        counts[max(0, int(t - start))] += 1
    return counts


@dataclass(frozen=True)
class Segment:
    """A limit in force from ``start`` until the next segment begins.

    ``start`` is in seconds on the clock the starts were recorded on (Redis
    time in the fleet tests); the first segment usually starts at 0.
    """

    start: float
    rate: float
    burst: int
    #: The segment before this one still admits for this long after ``start``:
    #: a reset of one tenant's bucket takes effect at once, and tasks the gate
    #: let through just before it start up to its wait in place (25 ms) after.
    carry: float = 0.0


@dataclass(frozen=True)
class Violation:
    """A window that held more starts than the limit allows."""

    first: float
    last: float
    starts: int
    allowed: float

    def __str__(self) -> str:
        return (
            f"{self.starts} starts in {self.last - self.first:.3f}s "
            f"[{self.first:.3f}, {self.last:.3f}], at most {self.allowed:.2f} allowed"
        )


def allowed_in(first: float, last: float, segments: Sequence[Segment], epsilon: float) -> float:
    """Starts the limit allows in ``[first, last]``: ``burst + rate * (w + epsilon)`` per
    segment the window touches, ``w`` its overlap (a change lets one fresh burst through)."""
    total = 0.0
    for index, seg in enumerate(segments):
        following = segments[index + 1] if index + 1 < len(segments) else None
        end = following.start + following.carry if following is not None else math.inf
        if last < seg.start or first >= end:
            continue
        overlap = min(last, end) - max(first, seg.start)
        total += seg.burst + seg.rate * (max(0.0, overlap) + epsilon)
    return total


def violations(times: Sequence[float], segments: Sequence[Segment], epsilon: float) -> list[Violation]:
    """Every window between two starts that holds more starts than allowed (all window lengths).

    The promise is checked on windows that begin and end at a start: a
    window without a start at an end holds no more starts than the one
    shrunk to them, and is allowed at least as many.
    """
    if not segments:
        raise ValueError("segments must name at least the limit in force from the start")
    ordered = sorted(times)
    found: list[Violation] = []
    for i, first in enumerate(ordered):
        for j in range(i, len(ordered)):
            count = j - i + 1
            allowed = allowed_in(first, ordered[j], segments, epsilon)
            if count > allowed + 1e-9:
                found.append(Violation(first, ordered[j], count, allowed))
    return found


@dataclass(frozen=True)
class InFlight:
    """How many spans (start, end) were open at once: a concurrency limit's bound, checked."""

    peak: int
    #: Time-weighted mean from the first start to the last end.
    mean: float
    #: The step curve: (seconds from the first start, open spans from then on).
    curve: tuple[tuple[float, int], ...]


def in_flight(spans: Sequence[tuple[float, float]]) -> InFlight:
    """Peak and time-weighted mean of open spans; an end at the same time as a start counts first."""
    if not spans:
        return InFlight(0, 0.0, ())
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    first = last = events[0][0]
    now = peak = 0
    area = 0.0
    curve = [(0.0, 0)]
    for at, step in events:
        area += now * (at - last)
        last = at
        now += step
        peak = max(peak, now)
        curve.append((at - first, now))
    span = events[-1][0] - first
    return InFlight(peak, area / span if span > 0 else 0.0, tuple(curve))
