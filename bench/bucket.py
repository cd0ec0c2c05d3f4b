"""`make bench`: throttle's bucket against a bare round trip, its own
transaction engine and two well-known peers, all in one run on one Redis.

Measures, per limiter:
- one client: decisions per second and p50/p99 latency;
- N processes hammering one key for D seconds: aggregate decisions/s and
  tokens granted against the ideal ``burst + rate * t``;
- the seed's client-clock design with hosts' clocks spread over +-2 s.

Writes a table to the terminal and everything as JSON to
``bench-output/bucket.json``.  Ratios are what to compare across machines;
absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from bench.hammer import hammer
from bench.limiters import (
    Decide,
    limits_moving_window,
    pyrate_token_bucket,
    seed_client_clock,
    throttle_bucket,
)
from throttle.testing.redis_server import RedisServer

RATE, BURST = 200.0, 20
HIGH_RATE, HIGH_BURST = 100_000.0, 1000

LIMITERS: dict[str, Callable[..., Decide]] = {
    "throttle script": partial(throttle_bucket, strategy="script"),
    "throttle transaction": partial(throttle_bucket, strategy="transaction"),
    "limits moving window": limits_moving_window,
    "pyrate-limiter TokenBucket": pyrate_token_bucket,
}


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def single_client(calls: dict[str, Callable[[], Any]], seconds: float, rounds: int = 10) -> dict[str, dict[str, float]]:
    """Calls per second and latency of each call from one client, back to back.

    The calls take turns in short rounds so that a noisy neighbour slows all
    of them alike; the rate reported is the median over rounds.
    """
    for call in calls.values():
        for _ in range(200):  # warm up connections and script caches
            call()
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            count = 0
            begin = time.perf_counter()
            deadline = begin + seconds / rounds
            while (start := time.perf_counter()) < deadline:
                call()
                latencies[name].append(time.perf_counter() - start)
                count += 1
            rates[name].append(count / (time.perf_counter() - begin))
    out: dict[str, dict[str, float]] = {}
    for name in calls:
        lat = sorted(latencies[name])
        out[name] = {
            "calls": len(lat),
            "per_s": statistics.median(rates[name]),
            "p50_us": _percentile(lat, 0.50) * 1e6,
            "p99_us": _percentile(lat, 0.99) * 1e6,
        }
    return out


def run(url: str, seconds: float, processes: int, duration: float) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    results: dict[str, Any] = {"rate": RATE, "burst": BURST, "processes": processes, "duration": duration}
    calls: dict[str, Callable[[], Any]] = {"PING round trip": client.ping}
    for name, factory in LIMITERS.items():
        decide = factory(url, f"bench:single:{name}", RATE, BURST)
        calls[name] = partial(decide, 1)
    single = single_client(calls, seconds)
    results["single"] = single

    contended: dict[str, dict[str, float]] = {}
    for name, factory in LIMITERS.items():
        key = f"bench:{processes}p:{name}:{time.time_ns()}"
        outcome = hammer(partial(factory, url, key, RATE, BURST), processes=processes, duration=duration)
        contended[name] = {
            "decisions_per_s": outcome.decisions_per_s,
            "errors": outcome.errors,
            "granted": outcome.tokens,
            "ideal": outcome.ideal(RATE, BURST),
            "granted_vs_ideal": outcome.tokens / outcome.ideal(RATE, BURST),
        }
    results["contended"] = contended

    # The same, with a limit so high that nearly every decision is a grant
    # (a write): here optimistic transactions keep invalidating each other.
    granting: dict[str, dict[str, float]] = {}
    for name in ("throttle script", "throttle transaction"):
        key = f"bench:grant:{name}:{time.time_ns()}"
        factory = partial(LIMITERS[name], url, key, HIGH_RATE, HIGH_BURST)
        outcome = hammer(factory, processes=processes, duration=duration)
        granting[name] = {
            "decisions_per_s": outcome.decisions_per_s,
            "granted_per_s": outcome.tokens / duration,
            "errors": outcome.errors,
        }
    results["contended_granting"] = granting

    skews = [-2.0 + 4.0 * i / (processes - 1) for i in range(processes)] if processes > 1 else [0.0]
    skewed: dict[str, dict[str, float]] = {}
    for name, factory in [("throttle script", LIMITERS["throttle script"]), ("seed, client clock", seed_client_clock)]:
        key = f"bench:skew:{name}:{time.time_ns()}"
        outcome = hammer(
            partial(factory, url, key, RATE, BURST), processes=processes, duration=duration, clock_skews=skews
        )
        skewed[name] = {"granted": outcome.tokens, "ideal": outcome.ideal(RATE, BURST)}
        skewed[name]["granted_vs_ideal"] = skewed[name]["granted"] / skewed[name]["ideal"]
    results["clock_skew"] = skewed

    script_single = single["throttle script"]["per_s"]
    script_many = contended["throttle script"]["decisions_per_s"]
    peers = [contended[n]["decisions_per_s"] for n in ("limits moving window", "pyrate-limiter TokenBucket")]
    results["ratios"] = {
        "script_single_vs_ping": script_single / single["PING round trip"]["per_s"],
        "script_contended_vs_transaction": script_many / contended["throttle transaction"]["decisions_per_s"],
        "script_contended_vs_best_peer": script_many / max(peers),
        "script_vs_transaction_when_granting": granting["throttle script"]["decisions_per_s"]
        / granting["throttle transaction"]["decisions_per_s"],
    }
    client.close()
    return results


def render(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"One client, back to back (limit {RATE:g}/s burst {BURST})")
    for col in ("limiter", "decisions/s", "p50 µs", "p99 µs"):
        table.add_column(col, justify="right" if col != "limiter" else "left")
    for name, row in results["single"].items():
        table.add_row(name, f"{row['per_s']:,.0f}", f"{row['p50_us']:.0f}", f"{row['p99_us']:.0f}")
    console.print(table)

    n, d = results["processes"], results["duration"]
    table = Table(title=f"{n} processes on one key for {d:g} s")
    for col in ("limiter", "decisions/s", "granted", "ideal burst+rate·t", "granted/ideal", "errors"):
        table.add_column(col, justify="right" if col != "limiter" else "left")
    for name, row in results["contended"].items():
        table.add_row(
            name,
            f"{row['decisions_per_s']:,.0f}",
            str(row["granted"]),
            f"{row['ideal']:.1f}",
            f"{row['granted_vs_ideal']:.3f}",
            str(row["errors"]),
        )
    console.print(table)

    table = Table(title=f"{n} processes on one key, limit {HIGH_RATE:g}/s: almost every decision writes")
    for col in ("limiter", "decisions/s", "granted/s", "errors"):
        table.add_column(col, justify="right" if col != "limiter" else "left")
    for name, row in results["contended_granting"].items():
        table.add_row(name, f"{row['decisions_per_s']:,.0f}", f"{row['granted_per_s']:,.0f}", str(row["errors"]))
    console.print(table)

    table = Table(title=f"{n} processes, host clocks spread over -2 s .. +2 s")
    for col in ("limiter", "granted", "ideal", "granted/ideal"):
        table.add_column(col, justify="right" if col != "limiter" else "left")
    for name, row in results["clock_skew"].items():
        table.add_row(name, str(row["granted"]), f"{row['ideal']:.1f}", f"{row['granted_vs_ideal']:.2f}")
    console.print(table)

    ratios = results["ratios"]
    console.print(
        f"script single-client / PING: [bold]{ratios['script_single_vs_ping']:.2f}[/]   "
        f"script {n}-process / transaction: [bold]{ratios['script_contended_vs_transaction']:.1f}x[/]   "
        f"script {n}-process / best peer: [bold]{ratios['script_contended_vs_best_peer']:.1f}x[/]   "
        f"script / transaction when granting: [bold]{ratios['script_vs_transaction_when_granting']:.1f}x[/]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="single-client run per limiter (default 3)")
    parser.add_argument("--processes", type=int, default=8, help="contending processes (default 8)")
    parser.add_argument("--duration", type=float, default=5.0, help="contended run per limiter (default 5)")
    parser.add_argument("--output", type=Path, default=Path("bench-output/bucket.json"))
    args = parser.parse_args(argv)
    console = Console(width=110)
    url = os.environ.get("REDIS_URL")
    server = None
    if url is None:
        server = RedisServer().start()
        url = server.url
        console.print(f"[dim]using {server.describe()}[/]")
    try:
        results = run(url, args.seconds, args.processes, args.duration)
    finally:
        if server is not None:
            server.close()
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    render(results, console)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    console.print(f"[dim]written {args.output}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
