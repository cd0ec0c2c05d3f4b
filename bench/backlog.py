"""`make bench`, part 3: a backlog that takes hours, countdowns vs the waiting room.

N tasks are sent at once under a limit that drains them in hours (2/s:
100,000 tasks = 14 hours).  Run side by side, on the same fleet shape (real
``celery worker`` processes, the machine's Redis broker on 6379, the buckets
in a Redis of the benchmark's own):

- **countdown**: every wait is a countdown message a worker holds
  (``throttle_park_after = off``, ``throttle_max_defer = 3600``, the old
  defaults);
- **room**: waits longer than a minute park in Redis (the defaults).

For each: tasks failed, workers' RSS, messages held unacked by the workers,
broker publishes per task, Redis memory per parked task, the time to take in
the whole backlog.  Then (room only) ``throttle set`` raises the limit to
``--raise-to`` and the whole backlog drains: each task exactly once, and the
most body starts in any second against the limit in force.

    python -m bench.backlog --tasks 100000          # what the README quotes
    python -m bench.backlog --tasks 5000 --observe 20

Writes a table and ``bench-output/backlog.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from throttle.live import LiveLimits
from throttle.metrics import read_metrics
from throttle.room import WaitingRoom
from throttle.testing.redis_server import RedisServer
from throttle.testing.windows import peak_in_window

OUT = Path("bench-output")
APP = "tests.paths_app"


def _rss_mb(pgids: set[int]) -> tuple[float, float]:
    """(all processes of these process groups, their leaders alone): resident MB."""
    total = leaders = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            pgrp = int(stat.rsplit(")", 1)[1].split()[2])
            if pgrp not in pgids:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    kb = float(line.split()[1])
                    total += kb / 1024
                    if int(entry) == pgrp:
                        leaders += kb / 1024
        except (OSError, ValueError, IndexError):
            continue
    return total, leaders


def run(design: str, tasks: int, rate: str, observe: float, raise_to: str | None, workers: int) -> dict[str, Any]:
    from tests.fleet import SYSTEM_REDIS_BROKER, Fleet, broker_available

    if not broker_available(SYSTEM_REDIS_BROKER):
        raise SystemExit(f"no Redis broker at {SYSTEM_REDIS_BROKER}")
    env = {"RECORD_ADMISSIONS": "0"}
    if design == "countdown":
        env.update(THROTTLE_PARK_AFTER="off", THROTTLE_MAX_DEFER="3600")
    console = Console()
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        from tests.celery.conftest import DEFAULT_LIMITS

        limits = {**DEFAULT_LIMITS, "paths": {"rate": rate, "burst": 1, "per_key": False}}
        fleet = Fleet(SYSTEM_REDIS_BROKER, server.url, server.url, limits=limits, workers=workers, concurrency=2,
                      extra_env=env, app_module=APP)  # fmt: skip
        broker = redis.Redis.from_url(SYSTEM_REDIS_BROKER)
        prefix = f"throttle-{fleet.queue}"
        room, live = WaitingRoom(client, prefix), LiveLimits(client, prefix)
        result: dict[str, Any] = {"design": design, "tasks": tasks, "rate": rate}
        try:
            fleet.start()
            pgids = {p.pid for p in fleet.processes}
            result["rss_before_mb"], result["rss_main_before_mb"] = _rss_mb(pgids)
            memory_before = int(client.info("memory")["used_memory"])
            started = time.monotonic()
            chunk = 5000
            for first in range(0, tasks, chunk):
                fleet.send("fleet.paths", [(n, ["ok"]) for n in range(first, min(tasks, first + chunk))])
            result["send_s"] = time.monotonic() - started
            console.print(f"[{design}] sent {tasks} in {result['send_s']:.1f}s")
            samples = []
            taken_in = None
            deadline = time.monotonic() + observe
            while time.monotonic() < deadline or (design == "room" and taken_in is None and
                                                  time.monotonic() < deadline + 3600):  # fmt: skip
                time.sleep(2)
                parked = sum(s.parked + s.claimed for s in room.stats(room.rooms("paths")))
                ran = client.llen(fleet.record_key)
                failed = sum(fleet.counts("failed").values())
                held = int(broker.hlen("unacked"))
                rss, rss_main = _rss_mb(pgids)
                queued = int(broker.llen(fleet.queue))
                sample = {
                    "t": round(time.monotonic() - started, 1), "ran": ran, "failed": failed, "held": held,
                    "parked": parked, "queued": queued, "rss_mb": round(rss, 1), "rss_main_mb": round(rss_main, 1),
                }  # fmt: skip
                samples.append(sample)
                console.print(f"[{design}] {sample}")
                if (
                    taken_in is None
                    and queued == 0
                    and (design == "countdown" or parked + ran + failed + held >= tasks)
                ):
                    taken_in = time.monotonic() - started
            result["taken_in_s"] = round(taken_in, 1) if taken_in is not None else None
            result["samples"] = samples
            last = samples[-1]
            result.update(
                failed=last["failed"], held=max(s["held"] for s in samples), parked=last["parked"],
                rss_growth_mb=round(max(s["rss_mb"] for s in samples) - result["rss_before_mb"], 1),
                rss_main_growth_mb=round(max(s["rss_main_mb"] for s in samples) - result["rss_main_before_mb"], 1),
            )  # fmt: skip
            if last["parked"]:
                used = int(client.info("memory")["used_memory"]) - memory_before
                result["redis_bytes_per_parked"] = round(used / last["parked"])
            if design == "room" and raise_to:
                result.update(_drain(fleet, live, client, tasks, raise_to, console))
            fields = read_metrics(client, prefix, ["paths"])["paths"]
            deferred = sum(v for k, v in fields.items() if k.startswith("deferred:"))
            publishes = tasks + deferred - fields.get("parked", 0) + fields.get("released", 0)
            result["publishes_per_task"] = round(publishes / tasks, 3)
            result["metrics"] = fields
        finally:
            fleet.stop()
            fleet.purge()
            client.close()
            broker.close()
    return result


def _drain(fleet: Any, live: LiveLimits, client: redis.Redis, tasks: int, raise_to: str,
           console: Console) -> dict[str, Any]:  # fmt: skip
    """Raise the limit and wait for every task to finish once."""
    live.set("paths", rate=raise_to, burst=1)
    change_at = live.read().pending["paths"].at
    started = time.monotonic()
    finished_key = f"{fleet.record_key}:finished"
    while client.llen(finished_key) < tasks and time.monotonic() - started < 3600:
        time.sleep(2)
        console.print(f"[room] drained {client.llen(finished_key)}/{tasks} in {time.monotonic() - started:.0f}s")
    drained_s = time.monotonic() - started
    finished: list[bytes] = client.lrange(finished_key, 0, -1)  # type: ignore[assignment]
    counts = Counter(finished)
    starts = [json.loads(r)["t"] for r in client.lrange(fleet.record_key, 0, -1)]
    after = sorted(t for t in starts if t >= change_at)
    # The last tasks are the countdowns workers held when the limit was
    # raised (waits under throttle_park_after): they learn of the change when
    # their countdown ends, up to a minute later.  99 % shows the room itself.
    most = after[int(0.99 * (len(after) - 1))] - change_at if after else None
    return {
        "raised_to": raise_to,
        "drain_s": round(drained_s, 1),
        "drain_99_s": round(most, 1) if most is not None else None,
        "drained_per_s": round(len(after) / drained_s, 1) if drained_s else None,
        "drained_per_s_99": round(0.99 * len(after) / most, 1) if most else None,
        "finished": len(counts),
        "ran_twice": sum(1 for c in counts.values() if c > 1),
        "peak_per_s_after_raise": peak_in_window(after, 1.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--rate", default="2/s")
    parser.add_argument("--observe", type=float, default=60.0, help="seconds to watch each design after sending")
    parser.add_argument("--raise-to", default="1000/s", help="then raise the limit to this and drain (room)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-countdown", action="store_true")
    args = parser.parse_args()
    designs = ["room"] if args.skip_countdown else ["countdown", "room"]
    results = [run(d, args.tasks, args.rate, args.observe, args.raise_to, args.workers) for d in designs]
    OUT.mkdir(exist_ok=True)
    (OUT / "backlog.json").write_text(json.dumps(results, indent=2))
    table = Table(title=f"{args.tasks} tasks at {args.rate}, {args.workers} prefork workers x 2")
    rows = [
        ("failed", "failed"), ("held by workers (max)", "held"), ("parked", "parked"),
        ("main processes' RSS growth, MB", "rss_main_growth_mb"), ("all processes' RSS growth, MB", "rss_growth_mb"),
        ("Redis bytes per parked task", "redis_bytes_per_parked"), ("backlog taken in, s", "taken_in_s"),
        ("publishes per task", "publishes_per_task"), ("drain after the raise, s", "drain_s"),
        ("drained per s", "drained_per_s"), ("99 % drained after the raise, s", "drain_99_s"),
        ("drained per s, first 99 %", "drained_per_s_99"), ("finished", "finished"), ("ran twice", "ran_twice"),
        ("peak per s after the raise", "peak_per_s_after_raise"),
    ]  # fmt: skip
    table.add_column("")
    for r in results:
        table.add_column(r["design"], justify="right")
    for label, key in rows:
        table.add_row(label, *(str(r.get(key, "-")) for r in results))
    Console().print(table)


if __name__ == "__main__":
    main()
