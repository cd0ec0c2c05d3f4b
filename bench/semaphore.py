"""`make bench`, part 4: what a fleet-wide semaphore costs and how full it stays.

- Redis calls per lease: one script call to acquire, one to release (and one
  per renewal, every expiry/3 while a block runs), counted by the server
  (``INFO commandstats``), with the server's microseconds per call;
- acquire + release cycles per second from 1 and 4 client processes;
- utilization: 8 processes share capacity 3 and hold each lease 20-60 ms
  (``acquire(timeout=...)``, which polls): in-flight computed from recorded
  start and end times (never above 3) and its time-weighted mean.

Writes a table and ``bench-output/semaphore.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from throttle import Semaphore
from throttle.testing.redis_server import RedisServer
from throttle.testing.windows import in_flight

CAPACITY = 3


def _evalsha_stats(client: redis.Redis) -> tuple[int, float]:
    """(calls, usec) of EVALSHA and EVAL so far on this server."""
    stats: dict[str, Any] = client.info("commandstats")
    calls = usec = 0.0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        if name in stats:
            calls += stats[name]["calls"]
            usec += stats[name]["usec"]
    return int(calls), usec


def _cycles(url: str, prefix: str, seconds: float) -> int:
    """Acquire and release as fast as one process can for ``seconds``; how many cycles."""
    sem = Semaphore(redis.Redis.from_url(url), "cycles", CAPACITY, expiry=10, prefix=prefix)
    done = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        lease = sem.try_acquire()
        if lease is not None:
            lease.release()
            done += 1
    return done


def _hold(url: str, prefix: str, rounds: int, seed: int) -> list[tuple[float, float]]:
    """Hold a lease ``rounds`` times for 20-60 ms; the (start, end) of each hold, wall clock."""
    rng = random.Random(seed)
    sem = Semaphore(redis.Redis.from_url(url), "held", CAPACITY, expiry=10, prefix=prefix)
    spans = []
    for _ in range(rounds):
        with sem.acquire(timeout=120):
            start = time.time()
            time.sleep(rng.uniform(0.02, 0.06))
            spans.append((start, time.time()))
    return spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--rounds", type=int, default=60, help="holds per process in the utilization run")
    parser.add_argument("--out", type=Path, default=Path("bench-output"))
    args = parser.parse_args(argv)
    console = Console()
    server = RedisServer()
    server.start()
    ctx = multiprocessing.get_context("spawn")
    try:
        client = redis.Redis.from_url(server.url)
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        sem = Semaphore(client, "calls", CAPACITY, expiry=0.3, prefix=prefix)
        calls0, usec0 = _evalsha_stats(client)
        for _ in range(1000):
            lease = sem.try_acquire()
            assert lease is not None
            lease.release()
        calls1, usec1 = _evalsha_stats(client)
        with sem.acquire(timeout=1):
            time.sleep(1.0)  # renewed every 0.1 s
        calls2, _ = _evalsha_stats(client)
        results: dict[str, Any] = {
            "calls_per_lease": (calls1 - calls0) / 1000,
            "server_usec_per_call": (usec1 - usec0) / max(1, calls1 - calls0),
            "calls_for_a_1s_block_expiry_0.3s": calls2 - calls1,
        }
        for processes in (1, 4):
            with ctx.Pool(processes) as pool:
                counts = pool.starmap(_cycles, [(server.url, prefix, args.seconds)] * processes)
            results[f"cycles_per_s_{processes}_processes"] = sum(counts) / args.seconds
        with ctx.Pool(8) as pool:
            parts = pool.starmap(_hold, [(server.url, prefix, args.rounds, n) for n in range(8)])
        spans = [span for part in parts for span in part]
        found = in_flight(spans)
        peak, mean = found.peak, found.mean
        results.update({"holds": len(spans), "peak_in_flight": peak, "mean_in_flight": mean, "capacity": CAPACITY})
        client.close()
    finally:
        server.close()

    table = Table(title=f"Semaphore (capacity {CAPACITY})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("script calls per acquire + release", f"{results['calls_per_lease']:.2f}")
    table.add_row("server time per call", f"{results['server_usec_per_call']:.1f} µs")
    table.add_row("calls for a 1 s block, expiry 0.3 s (acquire, 9 renewals, release)",
                  str(results["calls_for_a_1s_block_expiry_0.3s"]))  # fmt: skip
    for processes in (1, 4):
        table.add_row(f"acquire + release per second, {processes} process(es)",
                      f"{results[f'cycles_per_s_{processes}_processes']:,.0f}")  # fmt: skip
    table.add_row("8 processes holding 20-60 ms: most in flight", f"{peak} (capacity {CAPACITY})")
    table.add_row("  time-weighted mean in flight", f"{mean:.2f} ({mean / CAPACITY:.0%} of capacity)")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "semaphore.json").write_text(json.dumps(results, indent=2))
    return 0 if peak <= CAPACITY else 1


if __name__ == "__main__":
    raise SystemExit(main())
