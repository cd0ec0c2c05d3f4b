"""N processes hammering one bucket at once: the fidelity test and the benchmark.

Each process builds its own client after start-up (never share a connection
across processes), waits for a common start instant, then asks for tokens as
fast as it can until the common deadline, recording the Redis time of every
grant.  Only the parent aggregates.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

#: A limiter under test, built inside the worker process: returns a callable
#: ``decide(cost) -> (allowed, server_time or None)``.
Factory = Callable[[], Callable[[int], tuple[bool, float | None]]]


@dataclass
class HammerResult:
    processes: int
    duration: float
    decisions: int
    errors: int
    grants: list[tuple[float, int]] = field(default_factory=list)  # (time, cost)
    client_cpu: float = 0.0  # CPU seconds the processes spent in the timed loop

    @property
    def tokens(self) -> int:
        return sum(cost for _, cost in self.grants)

    @property
    def span(self) -> float:
        """Seconds from the first grant to the last."""
        if not self.grants:
            return 0.0
        times = [t for t, _ in self.grants]
        return max(times) - min(times)

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.duration

    def ideal(self, rate: float, burst: int) -> float:
        """The most a perfect bucket may grant over the grants' span."""
        return burst + rate * self.span


def _worker(
    factory: Factory,
    costs: Sequence[int],
    start_at: float,
    duration: float,
    clock_skew: float,
) -> tuple[int, int, list[tuple[float, int]], float]:
    if clock_skew:
        # Shift this process's wall clock, as a host whose clock is off would.
        real_time = time.time
        time.time = lambda: real_time() + clock_skew
    decide = factory()
    rng = random.Random(os.getpid())
    while time.monotonic() < start_at:
        time.sleep(0.0005)
    deadline = start_at + duration
    cpu_at_start = time.process_time()
    decisions = errors = 0
    grants: list[tuple[float, int]] = []
    while (now := time.monotonic()) < deadline:
        cost = rng.choice(costs)
        try:
            allowed, server_time = decide(cost)
        except Exception:
            errors += 1
            continue
        decisions += 1
        if allowed:
            grants.append((server_time if server_time is not None else now, cost))
    return decisions, errors, grants, time.process_time() - cpu_at_start


def hammer(
    factory: Factory,
    processes: int = 8,
    duration: float = 5.0,
    costs: Sequence[int] = (1,),
    clock_skews: Sequence[float] | None = None,
    warmup: float = 3.0,
) -> HammerResult:
    """Run ``processes`` workers for ``duration`` seconds; all grants, merged.

    ``factory`` must be picklable (a module-level function or a
    ``functools.partial`` of one): it travels to spawned processes.
    """
    skews = list(clock_skews) if clock_skews is not None else [0.0] * processes
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
        # CLOCK_MONOTONIC is one clock for every process on the host.
        start_at = time.monotonic() + warmup
        futures = [pool.submit(_worker, factory, costs, start_at, duration, skews[i]) for i in range(processes)]
        result = HammerResult(processes, duration, 0, 0)
        for future in futures:
            decisions, errors, grants, cpu = future.result(timeout=warmup + duration + 60)
            result.client_cpu += cpu
            result.decisions += decisions
            result.errors += errors
            result.grants.extend(grants)
    return result
