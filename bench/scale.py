"""`make bench`, part 2: how throttle scales, all in one run on this machine.

- decisions/s against 1, 2, 4, 8, 16 client processes, on one key and on
  many keys (1,000 tenants), with the CPU the clients and Redis used;
- the same many-keys load on one Redis and on a 3-master Redis Cluster,
  and how the keys spread over its shards;
- the server-side cost of one decision (``INFO commandstats``), and from it
  the decisions/s one Redis core can serve;
- 100 decisions batched (``consume_many``) against 100 single calls;
- the Celery gate: a no-op task through a real worker with and without
  ``ThrottledTask`` (needs the Redis broker on 127.0.0.1:6379);
- memory: 1,000,000 tenant buckets created, measured, and left to expire.

Writes tables, ``bench-output/scale.json`` and a plot ``bench-output/scale.png``.
On a machine with few cores the client processes compete with Redis for
them: the CPU columns say who ran out first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from bench.hammer import HammerResult, hammer
from bench.limiters import throttle_bucket, throttle_many_keys
from throttle import Limit, TokenBucket, consume_many
from throttle.testing.cluster import EmbeddedCluster
from throttle.testing.redis_server import RedisServer

RATE, BURST = 1000.0, 100
PROCESS_COUNTS = (1, 2, 4, 8, 16)
TENANTS = 1000


def _cpu_seconds(urls: list[str]) -> float:
    """CPU seconds (user + sys) the Redis servers behind ``urls`` have used."""
    total = 0.0
    for url in urls:
        info = redis.Redis.from_url(url).info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def _load(factory: Callable[[], Any], processes: int, duration: float, servers: list[str]) -> dict[str, float]:
    before = _cpu_seconds(servers)
    wall = time.monotonic()
    result: HammerResult = hammer(factory, processes=processes, duration=duration, warmup=2.0)
    wall = time.monotonic() - wall
    redis_cpu = _cpu_seconds(servers) - before
    return {
        "processes": processes,
        "decisions_per_s": result.decisions_per_s,
        "errors": result.errors,
        "client_cores": result.client_cpu / duration,
        # Redis' CPU over the whole call (spawn and warm-up included), per second of load.
        "redis_cores": redis_cpu / max(duration, wall - 2.0),
    }


def scaling(url: str, duration: float) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {"one key": [], "many keys": []}
    for n in PROCESS_COUNTS:
        tag = uuid.uuid4().hex[:6]
        out["one key"].append(_load(partial(throttle_bucket, url, f"s1-{tag}", RATE, BURST), n, duration, [url]))
        many = partial(throttle_many_keys, url, f"sm-{tag}", RATE, BURST, TENANTS)
        out["many keys"].append(_load(many, n, duration, [url]))
    return out


def server_cost(url: str, seconds: float) -> dict[str, float]:
    """usec_per_call of the bucket script on the server, one key and many keys."""
    client = redis.Redis.from_url(url)
    out: dict[str, float] = {}
    limit = Limit(RATE, BURST)
    for name, keys in (("one key", 1), ("many keys", TENANTS)):
        buckets = [TokenBucket(client, f"cost-{uuid.uuid4().hex[:6]}:{i}", rate=limit) for i in range(keys)]
        buckets[0].peek()
        client.config_resetstat()
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            buckets[i % keys].consume()
            i += 1
        out[name] = float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
    client.close()
    return out


def cluster_vs_single(single_url: str, duration: float, processes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with EmbeddedCluster(masters=3) as cluster:
        servers = [s.url for s in cluster.servers]
        tag = uuid.uuid4().hex[:6]
        out["single"] = _load(
            partial(throttle_many_keys, single_url, f"cs-{tag}", RATE, BURST, TENANTS),
            processes,
            duration,
            [single_url],
        )
        out["cluster"] = _load(
            partial(throttle_many_keys, cluster.url, f"cc-{tag}", RATE, BURST, TENANTS), processes, duration, servers
        )
        stats = [redis.Redis.from_url(u).info("commandstats").get("cmdstat_evalsha", {}) for u in servers]
        calls = [int(s.get("calls", 0)) for s in stats]
        out["decisions_per_shard"] = calls
        out["shard_share"] = [c / sum(calls) for c in calls] if sum(calls) else []
        out["script_usec_per_call_per_shard"] = [float(s.get("usec_per_call", 0)) for s in stats]
    return out


def batching(url: str, seconds: float, keys: int = 100) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    limit = Limit(100_000, 100_000)
    buckets = [TokenBucket(client, f"batch-{uuid.uuid4().hex[:6]}:{i}", rate=limit) for i in range(keys)]
    consume_many(buckets)

    def singles() -> None:
        for bucket in buckets:
            bucket.consume()

    def batched() -> None:
        consume_many(buckets)

    timings: dict[str, list[float]] = {"single": [], "batched": []}
    for _ in range(5):  # interleaved rounds: both see the same machine
        for name, fn in (("single", singles), ("batched", batched)):
            calls, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / 10:
                fn()
                calls += 1
            timings[name].append((time.perf_counter() - started) / calls)
    client.close()
    single, batch = statistics.median(timings["single"]), statistics.median(timings["batched"])
    return {"keys": keys, "single_ms": single * 1e3, "batched_ms": batch * 1e3, "speedup": single / batch}


def celery_gate(bucket_url: str, tasks: int) -> dict[str, float] | None:
    """Tasks/s of one worker with and without the gate.

    The solo pool receives and runs tasks in one process, one after the
    other, so whatever the gate adds shows in the rate.  (With prefork the
    pool process runs the gate while the main process fetches the next
    message, and one gate's round trip hides behind the broker's.)
    """
    from tests.fleet import SYSTEM_REDIS_BROKER, Fleet, broker_available

    if not broker_available(SYSTEM_REDIS_BROKER):
        return None
    limits = {"api": {"rate": "1000000/s", "burst": 100000}, "tenant": {"rate": "1/s"}}
    fleet = Fleet(
        SYSTEM_REDIS_BROKER, bucket_url, bucket_url, limits=limits, workers=1, concurrency=1, pool="solo",
        extra_env={"RECORD_ADMISSIONS": "0"},
    )  # fmt: skip
    record = redis.Redis.from_url(bucket_url)
    rates: dict[str, list[float]] = {"fleet.noop": [], "fleet.noop_throttled": []}
    try:
        fleet.start()
        for _ in range(2):
            for name, measured in rates.items():
                record.delete(f"{fleet.record_key}:done")
                fleet.send(name, [() for _ in range(tasks)])
                deadline = time.monotonic() + 300
                while record.llen(f"{fleet.record_key}:done") < tasks and time.monotonic() < deadline:
                    time.sleep(0.05)
                done = [float(t) for t in record.lrange(f"{fleet.record_key}:done", 0, -1)]
                # From the first body to the last: the broker's delivery and the
                # worker's bookkeeping are in both; the gate only in one.
                measured.append((len(done) - 1) / (max(done) - min(done)))
    finally:
        fleet.stop()
        fleet.purge()
    plain, gated = statistics.median(rates["fleet.noop"]), statistics.median(rates["fleet.noop_throttled"])
    return {
        "tasks": tasks,
        "plain_per_s": plain,
        "throttled_per_s": gated,
        "ratio": gated / plain,
        "overhead_us_per_task": (1 / gated - 1 / plain) * 1e6,
    }


def memory(url: str, buckets: int) -> dict[str, float]:
    """Memory of ``buckets`` active tenant buckets, then of the same buckets idle."""
    client = redis.Redis.from_url(url)
    client.flushall()  # our own server, started by this run
    base = int(client.info("memory")["used_memory"])
    tag = uuid.uuid4().hex[:6]
    slow = Limit("1/h", 1)  # stays active (its key lives until refilled: 1 h)
    chunk = 1000
    started = time.monotonic()
    for first in range(0, buckets, chunk):
        consume_many([TokenBucket(client, f"m-{tag}:{i}", rate=slow) for i in range(first, first + chunk)])
    fill_s = time.monotonic() - started
    keyspace = client.info("keyspace").get("db0", {})
    used = int(client.info("memory")["used_memory"])
    sample = [int(client.memory_usage(f"throttle:{{m-{tag}:{i}}}") or 0) for i in range(0, buckets, buckets // 100)]
    value = client.get(f"throttle:{{m-{tag}:0}}") or b""
    result = {
        "buckets": buckets,
        "fill_seconds": fill_s,
        "keys": int(keyspace.get("keys", 0)),
        "keys_with_ttl": int(keyspace.get("expires", 0)),
        "bytes_per_active_bucket": (used - base) / buckets,
        "memory_usage_per_key": statistics.mean(sample),
        "value_bytes": len(value),
    }
    # Idle: a bucket that refilled has no key at all.  The same tenants at a
    # rate whose refill takes 1 ms: after one decision each, they expire.
    client.flushall()
    base = int(client.info("memory")["used_memory"])
    fast = Limit(1000, 1)
    for first in range(0, buckets, chunk):
        consume_many([TokenBucket(client, f"i-{tag}:{i}", rate=fast) for i in range(first, first + chunk)])
    started = time.monotonic()
    while client.dbsize() and time.monotonic() - started < 120:
        time.sleep(0.5)
    result["idle_keys_left"] = int(client.dbsize())
    result["expire_seconds"] = time.monotonic() - started
    result["bytes_per_idle_bucket"] = max(0, int(client.info("memory")["used_memory"]) - base) / buckets
    client.close()
    return result


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    for name, colour in (("one key", "#1f77b4"), ("many keys", "#2ca02c")):
        rows = results["scaling"][name]
        left.plot([r["processes"] for r in rows], [r["decisions_per_s"] for r in rows], "o-", color=colour,
                  label=f"{name}: decisions/s")  # fmt: skip
    cvs = results.get("cluster_vs_single")
    if cvs:
        n = cvs["single"]["processes"]
        left.plot([n], [cvs["cluster"]["decisions_per_s"]], "s", color="#d62728", markersize=9,
                  label=f"many keys, 3-shard cluster ({n} processes)")  # fmt: skip
    left.set_xscale("log", base=2)
    left.set_xticks(PROCESS_COUNTS, [str(n) for n in PROCESS_COUNTS])
    left.set_xlabel("client processes")
    left.set_ylabel("decisions per second")
    left.set_title(f"Decisions/s on {results['machine']['cpus']} cores (clients and Redis share them)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    labels, values = [], []
    batch = results["batching"]
    labels.append(f"consume_many vs\n{batch['keys']} single calls")
    values.append(batch["speedup"])
    gate = results.get("celery_gate")
    if gate:
        labels.append("Celery no-op:\nthrottled / plain")
        values.append(gate["ratio"])
    bars = right.bar(labels, values, color=["#2ca02c", "#9467bd"][: len(values)])
    right.bar_label(bars, [f"{v:.2f}x" for v in values])
    right.set_title("Ratios in the same run")
    right.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def render(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Decisions/s against client processes (limit {RATE:g}/s burst {BURST}; many keys: {TENANTS})")
    for col in ("processes", "one key /s", "clients' cores", "Redis cores", "many keys /s", "clients' cores ",
                "Redis cores "):  # fmt: skip
        table.add_column(col, justify="right")
    for one, many in zip(results["scaling"]["one key"], results["scaling"]["many keys"], strict=True):
        table.add_row(
            str(one["processes"]), f"{one['decisions_per_s']:,.0f}", f"{one['client_cores']:.2f}",
            f"{one['redis_cores']:.2f}", f"{many['decisions_per_s']:,.0f}", f"{many['client_cores']:.2f}",
            f"{many['redis_cores']:.2f}",
        )  # fmt: skip
    console.print(table)

    cost = results["server_cost"]
    console.print(
        f"Server-side cost of one decision (INFO commandstats): one key {cost['one key']:.2f} µs, "
        f"many keys {cost['many keys']:.2f} µs -> one Redis core serves up to "
        f"{1e6 / cost['many keys']:,.0f} decisions/s; N shards, N times that."
    )
    cvs = results.get("cluster_vs_single")
    if cvs:
        share = ", ".join(f"{s:.1%}" for s in cvs["shard_share"])
        console.print(
            f"Many keys, {cvs['single']['processes']} processes: one Redis {cvs['single']['decisions_per_s']:,.0f}/s "
            f"(clients {cvs['single']['client_cores']:.2f} cores, Redis {cvs['single']['redis_cores']:.2f}); "
            f"3-shard cluster {cvs['cluster']['decisions_per_s']:,.0f}/s (clients "
            f"{cvs['cluster']['client_cores']:.2f} cores, Redis {cvs['cluster']['redis_cores']:.2f}); "
            f"decisions per shard {share}"
        )
    batch = results["batching"]
    console.print(
        f"{batch['keys']} decisions: single calls {batch['single_ms']:.2f} ms, consume_many "
        f"{batch['batched_ms']:.2f} ms -> [bold]{batch['speedup']:.1f}x[/]"
    )
    gate = results.get("celery_gate")
    if gate:
        console.print(
            f"Celery no-op task, one solo-pool worker: plain {gate['plain_per_s']:,.0f}/s, throttled "
            f"{gate['throttled_per_s']:,.0f}/s (ratio {gate['ratio']:.2f}, +{gate['overhead_us_per_task']:.0f} µs/task)"
        )
    else:
        console.print("[dim]Celery gate: skipped (no Redis broker on 127.0.0.1:6379)[/]")
    mem = results.get("memory")
    if mem:
        console.print(
            f"{mem['buckets']:,} active buckets: {mem['bytes_per_active_bucket']:.0f} B each in used_memory "
            f"(MEMORY USAGE {mem['memory_usage_per_key']:.0f} B per key, value {mem['value_bytes']} B), "
            f"{mem['keys_with_ttl']:,}/{mem['keys']:,} keys with a TTL; idle: "
            f"{mem['bytes_per_idle_bucket']:.1f} B each, {mem['idle_keys_left']} keys left after "
            f"{mem['expire_seconds']:.0f} s"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load point (default 3)")
    parser.add_argument("--buckets", type=int, default=1_000_000, help="tenant buckets for memory (0: skip)")
    parser.add_argument("--gate-tasks", type=int, default=1000, help="no-op tasks per gate run (0: skip)")
    parser.add_argument("--output", type=Path, default=Path("bench-output/scale.json"))
    args = parser.parse_args(argv)
    console = Console(width=120)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with RedisServer() as server:
        console.print(f"[dim]using {server.describe()}[/]")
        results["scaling"] = scaling(server.url, args.duration)
        results["server_cost"] = server_cost(server.url, 2.0)
        results["cluster_vs_single"] = cluster_vs_single(server.url, args.duration, 8)
        results["batching"] = batching(server.url, 5.0)
        results["celery_gate"] = celery_gate(server.url, args.gate_tasks) if args.gate_tasks else None
        if args.buckets:
            results["memory"] = memory(server.url, args.buckets)
    render(results, console)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    png = args.output.with_suffix(".png")
    plot(results, png)
    console.print(f"[dim]written {args.output} and {png}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
