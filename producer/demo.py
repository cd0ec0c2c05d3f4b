"""``make demo``: a fleet of Celery workers against a rate-limited API, measured.

Starts, on this machine: a Redis (embedded, or ``REDIS_URL``), the mock API
enforcing the limit, K reference workers (prefork), then sends the load and
watches the API.  Prints a report and one JSON line, writes a plot.  With
``--compare`` it runs the same load again with Celery's built-in per-worker
``rate_limit`` instead of throttle.  Everything it starts it stops, on
success, failure or Ctrl-C.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click
import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from throttle.keys import stats_key
from throttle.limit import parse_rate
from throttle.testing.processes import Children
from throttle.testing.redis_server import RedisServer, free_port
from worker.config import worker_env

from .load import PATTERNS, LoadPlan, producer_app, send_load
from .report import RunResult, plot_runs, summarise

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Setup:
    workers: int
    concurrency: int
    tasks: int
    limit: str
    burst: int
    pattern: str
    rate: float
    tenants: int
    duration: float
    compare: bool
    api_mode: str
    output: Path

    @property
    def limit_per_s(self) -> float:
        return parse_rate(self.limit)


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _post(url: str) -> None:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=5.0):
        pass


def _wait_until(check: Callable[[], bool], timeout: float, what: str, children: Children) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = children.dead()
        if dead:
            name, code = dead[0]
            raise RuntimeError(f"{name} exited with code {code}; see {children.log_dir / (name + '.log')}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready within {timeout:g}s; logs in {children.log_dir}")


class Demo:
    def __init__(self, setup: Setup, console: Console) -> None:
        self.setup = setup
        self.console = console
        self.run_id = uuid.uuid4().hex[:8]
        self.children = Children(setup.output / "logs")
        self.redis_server: RedisServer | None = None
        self.redis_url = ""
        self.api_url = ""
        self.prefix = f"throttle-demo-{self.run_id}"
        self.queue = f"throttle-demo-{self.run_id}"

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        setup, console = self.setup, self.console
        given = os.environ.get("REDIS_URL")
        if given:
            self.redis_url = given
            console.print(f"Redis: {given} (from REDIS_URL)")
        else:
            self.redis_server = RedisServer().start()
            self.redis_url = self.redis_server.url
            console.print(f"Redis: embedded {self.redis_server.describe()}, pid {self.redis_server.pid}")
        redis.Redis.from_url(self.redis_url).ping()

        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        pid = self.children.spawn(
            "api",
            [sys.executable, "-m", "worker.mock_api", "--port", str(port), "--rate", setup.limit,
             "--burst", str(setup.burst), "--mode", setup.api_mode],
            self.env, cwd=ROOT,
        )  # fmt: skip
        _wait_until(lambda: _get_json(f"{self.api_url}/health")["ok"], 15, "mock API", self.children)
        console.print(f"API: mock on {self.api_url}, pid {pid}, its own limit {setup.limit} + burst {setup.burst} "
                      f"({setup.api_mode}); answers 429 above it")  # fmt: skip

        pids = []
        for i in range(setup.workers):
            pids.append(
                self.children.spawn(
                    f"worker{i}",
                    [
                        sys.executable,
                        "-m",
                        "worker",
                        "-P",
                        "prefork",
                        "-c",
                        str(setup.concurrency),
                        "-n",
                        f"demo{i}-{self.run_id}@%h",
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                    ],
                    self.env,
                    cwd=ROOT,
                )
            )
        stats = redis.Redis.from_url(self.redis_url)
        _wait_until(
            lambda: int(stats.hget(self.stats_key, "workers_ready") or 0) >= setup.workers,
            90,
            f"{setup.workers} workers",
            self.children,
        )
        console.print(f"Workers: {setup.workers} x prefork concurrency {setup.concurrency}, pids {pids}")

    @property
    def stats_key(self) -> str:
        return stats_key(self.prefix)

    @property
    def env(self) -> dict[str, str]:
        limits = {"api": {"rate": self.setup.limit, "burst": self.setup.burst}}
        return worker_env(
            self.redis_url, self.redis_url, limits, self.prefix, self.queue,
            API_URL=self.api_url,
            BUILTIN_RATE_LIMIT=self.setup.limit,
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )  # fmt: skip

    # -- one run -------------------------------------------------------------

    def run(self, label: str, task: str) -> RunResult:
        setup = self.setup
        _post(f"{self.api_url}/reset")
        stats = redis.Redis.from_url(self.redis_url)
        deferred_before = int(stats.hget(self.stats_key, "deferred") or 0)
        plan = LoadPlan(setup.tasks, setup.pattern, setup.rate, tenants=setup.tenants, task=task)
        app = producer_app(self.env)
        sent: list[str] = []
        started = time.monotonic()
        deadline = started + setup.duration

        def table(api: dict[str, Any]) -> Table:
            recent = api["per_second"][-2] if len(api["per_second"]) >= 2 else (api["per_second"] or [0])[-1]
            deferred = int(stats.hget(self.stats_key, "deferred") or 0) - deferred_before
            grid = Table(title=f"{label}: {setup.workers} workers, limit {setup.limit} burst {setup.burst}")
            for col in ("sent", "done", "API req/s now", "peak in 1 s", "429s", "deferrals", "elapsed"):
                grid.add_column(col, justify="right")
            grid.add_row(
                f"{len(sent)}/{setup.tasks}", str(api["task_ids_ok"]), str(recent), str(api["peak_1s"]),
                str(api["http_429"]), str(deferred), f"{time.monotonic() - started:.1f}s",
            )  # fmt: skip
            return grid

        with Live(table(_get_json(f"{self.api_url}/stats")), console=self.console, refresh_per_second=4) as live:
            sent.extend(send_load(app, plan, stop=lambda: time.monotonic() > deadline))
            while time.monotonic() < deadline:
                api = _get_json(f"{self.api_url}/stats")
                live.update(table(api))
                if api["task_ids_ok"] >= len(sent):
                    break
                dead = self.children.dead()
                if dead:
                    raise RuntimeError(f"{dead[0][0]} exited with code {dead[0][1]} during the run")
                time.sleep(0.25)
            live.update(table(_get_json(f"{self.api_url}/stats")))
        requests = _get_json(f"{self.api_url}/requests")
        deferred = int(stats.hget(self.stats_key, "deferred") or 0) - deferred_before
        return summarise(label, requests, sent, setup.limit_per_s, setup.burst, setup.workers, deferred)

    def stop(self) -> int:
        stopped = self.children.stop_all()
        if self.redis_server is not None:
            stopped += 1
            self.redis_server.close()
            self.redis_server = None
        return stopped


def report(runs: list[RunResult], console: Console, plot: Path) -> None:
    table = Table(title="What the API saw")
    table.add_column("")
    for run in runs:
        table.add_column(run.label, justify="right")
    rows: list[tuple[str, Callable[[RunResult], str]]] = [
        ("configured limit", lambda r: f"{r.limit_per_s:g}/s burst {r.burst}"),
        ("peak requests in any 1 s", lambda r: str(r.peak_1s)),
        ("mean requests/s", lambda r: f"{r.mean_per_s:.2f}"),
        ("tasks done / sent", lambda r: f"{r.tasks_done} / {r.tasks_sent}"),
        ("HTTP 429 answers", lambda r: str(r.http_429)),
        ("throttle deferrals per task", lambda r: f"{r.deferrals_per_task:.2f}"),
        ("first to last request", lambda r: f"{r.duration_s:.2f} s"),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(r) for r in runs))
    console.print(table)
    console.print(f"plot: {plot}")


def _one_line_errors(main: click.Command) -> Callable[[], None]:
    """Bad flags end the demo with one line on stderr and exit code 2."""

    def run() -> None:
        try:
            code = main.main(prog_name="python -m producer.demo", standalone_mode=False)
        except click.exceptions.UsageError as exc:
            print(f"demo: error: {exc.format_message()}", file=sys.stderr)
            sys.exit(2)
        except click.exceptions.Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    return run


def _positive_rate(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        parse_rate(value)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workers", "-k", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Celery worker processes (prefork)")  # fmt: skip
@click.option("--concurrency", "-c", type=click.IntRange(min=1, max=32), default=2, show_default=True,
              help="pool processes per worker")  # fmt: skip
@click.option("--tasks", "-n", type=click.IntRange(min=1, max=100_000), default=300, show_default=True)
@click.option("--limit", default="20/s", show_default=True, callback=_positive_rate,
              help="the fleet-wide limit and the API's own: 20/s, 600/m, 2.5")  # fmt: skip
@click.option("--burst", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--pattern", type=click.Choice(PATTERNS), default="burst", show_default=True,
              help="how the producer sends: all at once, steady, or waves")  # fmt: skip
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="producer's tasks per second for steady")  # fmt: skip
@click.option("--tenants", type=click.IntRange(min=0), default=0, show_default=True,
              help="spread calls over N tenants, each with its own bucket")  # fmt: skip
@click.option("--duration", type=click.FloatRange(min=1, max=3600), default=120.0, show_default=True,
              help="give up on a run after this many seconds")  # fmt: skip
@click.option("--compare/--no-compare", default=False,
              help="also run the same load with Celery's built-in per-worker rate_limit")  # fmt: skip
@click.option("--api-mode", type=click.Choice(["window", "bucket"]), default="window", show_default=True,
              help="the API's own limit: at most limit+burst in any 1 s (window), or a token bucket")  # fmt: skip
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"),
              show_default=True)  # fmt: skip
def main(**options: Any) -> int:
    """Run a Celery fleet against a rate-limited API and show that throttle held the limit."""
    setup = Setup(**options)
    console = Console()
    demo = Demo(setup, console)

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C stops the run even when the demo was started with SIGINT ignored
    # (a background job of a non-interactive shell, as CI runners start
    # commands): Python installs no handler of its own then.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # `kill -USR1 <pid>` prints every thread's stack: where a run is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    runs: list[RunResult] = []
    try:
        demo.start()
        runs.append(demo.run("throttle", "worker.call_api"))
        if setup.compare:
            runs.append(demo.run("built-in rate_limit", "worker.call_api_unthrottled"))
    except KeyboardInterrupt:
        stopped = demo.stop()
        console.print(f"[yellow]interrupted: stopped {stopped} processes it had started (pids ended, none left)[/]")
        return 130
    except Exception as exc:
        stopped = demo.stop()
        console.print(f"[red]demo failed: {exc}[/] (stopped {stopped} processes)")
        return 1
    stopped = demo.stop()
    console.print(f"stopped {stopped} processes")
    plot = plot_runs(runs, setup.output / "throttle-demo.png")
    report(runs, console, plot)
    summary = runs[0].as_json()
    line = {
        key: summary[key]
        for key in ("limit_per_s", "burst", "peak_1s", "mean_per_s", "tasks_done", "tasks_sent", "http_429",
                    "deferrals_per_task")
    }  # fmt: skip
    line["plot"] = str(plot)
    if len(runs) > 1:
        line["builtin"] = {k: runs[1].as_json()[k] for k in ("peak_1s", "mean_per_s", "http_429", "tasks_done")}
    print(json.dumps(line), flush=True)
    return 0


run = _one_line_errors(main)

if __name__ == "__main__":
    run()
