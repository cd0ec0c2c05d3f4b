"""`make bench`, part 5: what a concurrency limit costs and how full it keeps its leases.

- The gate's cost: a no-op task through one solo-pool worker, plain, behind
  a rate, a concurrency, and both; tasks/s, µs added per task, and the
  script calls per task counted on the buckets' own Redis (target: the
  lease taken in the gate's one round trip, given back in one more).
- Utilization: 4 prefork workers x c4, concurrency 5, bodies of 0.2-1.0 s
  (in flight from each body's recorded start and end): peak, time-weighted
  mean, throughput.  The same bodies behind a rate sized to the same mean
  throughput (5 / 0.6 s = 8.33/s) show what a rate alone lets in flight.

Needs the Redis broker on 127.0.0.1:6379.  Writes a table,
``bench-output/concurrency.json`` and ``bench-output/concurrency.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from throttle.testing.redis_server import RedisServer
from throttle.testing.windows import in_flight

APP = "tests.concurrency_app"
CAPACITY = 5
LOW, HIGH = 0.2, 1.0


def _limits(extra: dict[str, Any]) -> dict[str, Any]:
    from tests.celery.conftest import CONCURRENCY_LIMITS, DEFAULT_LIMITS

    base = {
        **CONCURRENCY_LIMITS,
        "slots": {"concurrency": 1000},
        "slots_rated": {"rate": "1000000/s", "burst": 100000, "concurrency": 1000},
        "rate_only": {"rate": "1000000/s", "burst": 100000},
        "api": {"rate": "1000000/s", "burst": 100000},
    }
    return {**DEFAULT_LIMITS, **base, **extra}


def gate_cost(bucket_url: str, record_url: str, tasks: int) -> dict[str, dict[str, float]]:
    """Tasks/s and script calls per task of no-op tasks, by what they are behind."""
    from tests.fleet import SYSTEM_REDIS_BROKER, Fleet

    names = {
        "plain": "fleet.noop",
        "rate": "fleet.noop_throttled",
        "concurrency": "fleet.noop_slots",
        "rate + concurrency": "fleet.noop_slots_rated",
    }
    fleet = Fleet(
        SYSTEM_REDIS_BROKER, bucket_url, record_url, limits=_limits({}), workers=1, concurrency=1, pool="solo",
        extra_env={"RECORD_ADMISSIONS": "0"}, app_module=APP,
    )  # fmt: skip
    record = redis.Redis.from_url(record_url)
    bucket = redis.Redis.from_url(bucket_url)
    rates: dict[str, list[float]] = {k: [] for k in names}
    calls: dict[str, float] = {}
    try:
        fleet.start()
        for _ in range(2):
            for label, name in names.items():
                record.delete(f"{fleet.record_key}:done")
                bucket.config_resetstat()
                fleet.send(name, [() for _ in range(tasks)])
                deadline = time.monotonic() + 300
                while record.llen(f"{fleet.record_key}:done") < tasks and time.monotonic() < deadline:
                    time.sleep(0.05)
                done = [float(t) for t in record.lrange(f"{fleet.record_key}:done", 0, -1)]
                rates[label].append((len(done) - 1) / (max(done) - min(done)))
                stats = bucket.info("commandstats")
                evalsha = stats.get("cmdstat_evalsha", {})
                answered = int(evalsha.get("calls", 0)) - int(evalsha.get("failed_calls", 0))
                live_reads = int(stats.get("cmdstat_hgetall", {}).get("calls", 0)) // 4
                calls[label] = (answered - live_reads) / tasks
    finally:
        fleet.stop()
        fleet.purge()
        record.close()
        bucket.close()
    plain = statistics.median(rates["plain"])
    out: dict[str, dict[str, float]] = {}
    for label in names:
        per_s = statistics.median(rates[label])
        out[label] = {"tasks_per_s": per_s, "us_per_task": (1 / per_s - 1 / plain) * 1e6, "calls": calls[label]}
    return out


def _spans(fleet: Any) -> list[tuple[float, float]]:
    starts: dict[tuple[str, int], float] = {}
    spans = []
    for r in fleet.records():
        if r.get("phase") == "start":
            starts[(r["id"], r["pid"])] = r["t"]
        elif r.get("phase") == "end":
            spans.append((starts.pop((r["id"], r["pid"])), r["t"]))
    return spans


def utilization(bucket_url: str, record_url: str, tasks: int, seed: int) -> dict[str, Any]:
    """The issue's case: concurrency 5, bodies of 0.2-1.0 s, on 16 pool processes; then a rate alone."""
    from tests.fleet import SYSTEM_REDIS_BROKER, Fleet

    rng = random.Random(seed)
    calls = [(i, round(rng.uniform(LOW, HIGH), 3)) for i in range(tasks)]
    mean_body = statistics.mean(s for _, s in calls)
    rate = CAPACITY / mean_body
    out: dict[str, Any] = {"tasks": tasks, "mean_body_s": mean_body}
    for label, task, limits in (
        ("concurrency", "fleet.held", {"slots": {"concurrency": CAPACITY}}),
        ("rate", "fleet.held_rate_only", {"rate_only": {"rate": round(rate, 3), "burst": 1}}),
    ):
        fleet = Fleet(SYSTEM_REDIS_BROKER, bucket_url, record_url, limits=_limits(limits), workers=4, concurrency=4,
                      app_module=APP)  # fmt: skip
        try:
            fleet.start()
            started = time.monotonic()
            fleet.send(task, calls)
            deadline = time.monotonic() + tasks * HIGH + 120
            while len(_spans(fleet)) < tasks and time.monotonic() < deadline:
                time.sleep(0.2)
            spans = _spans(fleet)
            elapsed = time.monotonic() - started
        finally:
            fleet.stop()
            fleet.purge()
        found = in_flight(spans)
        peak, mean, curve = found.peak, found.mean, list(found.curve)
        first, last = min(s for s, _ in spans), max(e for _, e in spans)
        out[label] = {
            "finished": len(spans), "peak": peak, "mean_in_flight": mean, "seconds": elapsed,
            "tasks_per_s": (len(spans) - 1) / (last - first), "curve": curve,
            "limit": f"concurrency {CAPACITY}" if label == "concurrency" else f"{rate:.2f}/s burst 1",
        }  # fmt: skip
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=110)
    util = results["utilization"]
    for label, colour in (("concurrency", "#2ca02c"), ("rate", "#d62728")):
        curve = util[label]["curve"]
        ax.step(
            [t for t, _ in curve],
            [n for _, n in curve],
            where="post",
            color=colour,
            alpha=0.8,
            label=f"{util[label]['limit']}: peak {util[label]['peak']}, mean {util[label]['mean_in_flight']:.2f}",
        )
    ax.axhline(CAPACITY, color="black", linestyle="--", linewidth=1, label=f"concurrency limit {CAPACITY}")
    ax.set_xlabel("seconds from the first body")
    ax.set_ylabel("bodies in flight")
    ax.set_title(f"{util['tasks']} bodies of {LOW}-{HIGH} s on 16 pool processes: a concurrency limit vs a rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def render(results: dict[str, Any], console: Console) -> None:
    table = Table(title="The gate's cost: a no-op task, one solo-pool worker")
    for col in ("behind", "tasks/s", "µs added per task", "script calls per task"):
        table.add_column(col, justify="right")
    for label, row in results["gate"].items():
        table.add_row(label, f"{row['tasks_per_s']:,.0f}", f"{row['us_per_task']:.0f}", f"{row['calls']:.2f}")
    console.print(table)
    util = results["utilization"]
    table = Table(title=f"{util['tasks']} bodies of {LOW}-{HIGH} s (mean {util['mean_body_s']:.2f} s), 4 workers x c4")
    for col in ("limit", "peak in flight", "mean in flight", "tasks/s", "finished"):
        table.add_column(col, justify="right")
    for label in ("concurrency", "rate"):
        row = util[label]
        table.add_row(row["limit"], str(row["peak"]), f"{row['mean_in_flight']:.2f}", f"{row['tasks_per_s']:.2f}",
                      f"{row['finished']}/{util['tasks']}")  # fmt: skip
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noop-tasks", type=int, default=1000, help="no-op tasks per gate measurement")
    parser.add_argument("--tasks", type=int, default=200, help="bodies of 0.2-1.0 s in the utilization run")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench-output"))
    args = parser.parse_args(argv)
    from tests.fleet import SYSTEM_REDIS_BROKER, broker_available

    console = Console()
    if not broker_available(SYSTEM_REDIS_BROKER):
        console.print("[dim]bench.concurrency: skipped (no Redis broker on 127.0.0.1:6379)[/]")
        return 0
    with RedisServer() as bucket_server, RedisServer() as record_server:
        results = {
            "gate": gate_cost(bucket_server.url, record_server.url, args.noop_tasks),
            "utilization": utilization(bucket_server.url, record_server.url, args.tasks, args.seed),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "concurrency.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "concurrency.png")
    render(results, console)
    console.print(f"wrote {args.out / 'concurrency.json'} and {args.out / 'concurrency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
