"""What a demo run showed: numbers from the API's own log, and a plot.

Everything is measured where it matters, at the API: when each request
arrived, and whether it was answered 200 or 429.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from throttle.testing.windows import peak_in_window, per_second

__all__ = ["RunResult", "summarise", "plot_runs"]


@dataclass
class RunResult:
    """One run of the load against the API."""

    label: str
    limit_per_s: float
    burst: int
    workers: int
    tasks_sent: int
    tasks_done: int
    requests: int
    http_429: int
    peak_1s: int
    mean_per_s: float
    duration_s: float
    deferrals: int
    deferrals_per_task: float
    times: list[float]
    times_429: list[float]

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("times")
        data.pop("times_429")
        return data


def summarise(
    label: str,
    requests: Sequence[dict[str, Any]],
    sent_ids: Sequence[str],
    limit_per_s: float,
    burst: int,
    workers: int,
    deferrals: int,
) -> RunResult:
    """The run's figures from the API's request log."""
    sent = set(sent_ids)
    mine = [r for r in requests if r["task_id"] in sent]
    times = sorted(r["t"] for r in mine)
    ok = {r["task_id"] for r in mine if r["status"] == 200}
    duration = (times[-1] - times[0]) if len(times) > 1 else 0.0
    # The mean over the run: requests per second between the first and the
    # last request (N requests span N - 1 intervals).
    mean = (len(times) - 1) / duration if duration > 0 else float(len(times))
    return RunResult(
        label=label,
        limit_per_s=limit_per_s,
        burst=burst,
        workers=workers,
        tasks_sent=len(sent),
        tasks_done=len(ok),
        requests=len(mine),
        http_429=sum(1 for r in mine if r["status"] == 429),
        peak_1s=peak_in_window(times),
        mean_per_s=round(mean, 2),
        duration_s=round(duration, 2),
        deferrals=deferrals,
        deferrals_per_task=round(deferrals / len(sent), 3) if sent else 0.0,
        times=times,
        times_429=sorted(r["t"] for r in mine if r["status"] == 429),
    )


def plot_runs(runs: Sequence[RunResult], path: Path) -> Path:
    """Requests per second at the API over time, each run against the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    top = 0
    for run, colour in zip(runs, colours, strict=False):
        if not run.times:
            continue
        start = run.times[0]
        counts = per_second(run.times, start)
        top = max(top, *counts)
        ax.stairs(counts, range(len(counts) + 1), color=colour, linewidth=2.2, zorder=3,
                  label=f"{run.label}: requests/s (peak {run.peak_1s} in any 1 s)")  # fmt: skip
        if run.times_429:
            rejected = per_second(run.times_429, start)
            ax.stairs(rejected, range(len(rejected) + 1), color=colour, alpha=0.25, fill=True, zorder=2,
                      label=f"{run.label}: of which answered 429 ({run.http_429} in all)")  # fmt: skip
    limit = runs[0].limit_per_s
    burst = runs[0].burst
    ax.axhline(limit, color="grey", linestyle="--", linewidth=1.5, zorder=1, label=f"limit {limit:g}/s")
    ax.axhline(limit + burst, color="grey", linestyle=":", linewidth=1.2, zorder=1,
               label=f"limit + burst ({limit + burst:g} in any 1 s)")  # fmt: skip
    ax.set_title(f"Requests per second at the API: {runs[0].workers} Celery workers, limit {limit:g}/s burst {burst}")
    ax.set_xlabel("time since the run's first request (s)")
    ax.set_ylabel("requests per second (1 s bins)")
    ax.set_ylim(0, max(top, limit + burst) * 1.15)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
