"""``python -m producer``: enqueue load for the reference worker fleet.

Configured from the same environment variables as the worker (BROKER_URL,
WORKER_QUEUE, RESULT_BACKEND for ``--wait``).
"""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .load import PATTERNS, LoadPlan, producer_app, send_load


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--tasks", "-n", type=click.IntRange(min=1), default=300, show_default=True, help="tasks to send")
@click.option("--pattern", type=click.Choice(PATTERNS), default="burst", show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="tasks per second (steady)")  # fmt: skip
@click.option("--wave", type=click.IntRange(min=1), default=50, show_default=True, help="tasks per wave (waves)")
@click.option("--period", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="seconds between waves (waves)")  # fmt: skip
@click.option("--tenants", type=click.IntRange(min=0), default=0, show_default=True,
              help="spread calls over this many tenants (0: one shared limit)")  # fmt: skip
@click.option("--task", default="worker.call_api", show_default=True, help="task name to send")
@click.option("--wait/--no-wait", default=False, help="wait until every task finished (needs RESULT_BACKEND)")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="seconds to wait with --wait")  # fmt: skip
def main(
    tasks: int, pattern: str, rate: float, wave: int, period: float, tenants: int, task: str, wait: bool,
    timeout: float,
) -> None:  # fmt: skip
    """Send TASKS calls of the example task in a PATTERN, with a progress bar."""
    console = Console(stderr=True)
    try:
        plan = LoadPlan(tasks, pattern, rate, wave, period, tenants, task)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    app = producer_app()
    if wait and not app.conf.result_backend:
        raise click.UsageError("--wait needs RESULT_BACKEND (e.g. redis://localhost:6379/1)")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        sending = progress.add_task("sent", total=plan.tasks)
        ids = send_load(app, plan, on_sent=lambda n: progress.update(sending, completed=n))
        if wait:
            done = progress.add_task("done", total=len(ids))
            results = [app.AsyncResult(i) for i in ids]
            deadline = time.monotonic() + timeout
            finished = 0
            while finished < len(results) and time.monotonic() < deadline:
                finished = sum(r.ready() for r in results)
                progress.update(done, completed=finished)
                time.sleep(0.5)
            if finished < len(results):
                console.print(f"[red]{len(results) - finished} tasks not finished after {timeout:g}s[/]")
                sys.exit(1)
    console.print(f"sent {len(ids)} tasks ({plan.pattern}) to queue {app.conf.task_default_queue}")


if __name__ == "__main__":
    main(prog_name="python -m producer")
