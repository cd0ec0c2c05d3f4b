"""Counting events in time windows: how tests, the demo and the mock API check a limit.

A limit of ``rate`` per second with ``burst`` promises at most
``burst + rate * w`` events in any window of ``w`` seconds; these helpers
measure what actually happened from recorded times.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["peak_in_window", "per_second"]


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
