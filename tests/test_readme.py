"""The README's quickstarts run as written (against the test Redis)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart(name: str) -> str:
    """The first python block after the ``<!-- quickstart:NAME ... -->`` marker."""
    text = README.read_text()
    match = re.search(rf"<!-- quickstart:{name}\b.*?-->\s*```python\n(.*?)```", text, re.S)
    if match is None:
        pytest.fail(f"README has no quickstart:{name} block")
    return match.group(1)


def run_quickstart(name: str, redis_url: str, tmp_path: Path) -> str:
    """Run README block ``name`` as a script against ``redis_url``; its output."""
    script = tmp_path / f"{name}.py"
    script.write_text(quickstart(name))
    result = subprocess.run(
        [sys.executable, str(script)],
        env={"REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bucket_quickstart_runs(redis_url: str, tmp_path: Path) -> None:
    out = run_quickstart("bucket", redis_url, tmp_path)
    assert "call the API; 4 tokens left" in out
    assert "my slot is in" in out


def test_semaphore_quickstart_runs(redis_url: str, tmp_path: Path) -> None:
    out = run_quickstart("semaphore", redis_url, tmp_path)
    assert "in flight: 1" in out
    assert "got " in out


def test_original_example_names_exist() -> None:
    import redis_token_bucket

    assert redis_token_bucket.RedisTokenBucket.__init__.__code__.co_varnames[1:5] == (
        "redis_client",
        "key",
        "burst_rate",
        "replenishment_rate",
    )


@pytest.mark.fleet
def test_celery_quickstart_runs(redis_url: str, tmp_path: Path) -> None:
    """tasks.py from the README, a real worker, 30 tasks: 10/s burst 5 holds."""
    run_celery_quickstart(sys.executable, redis_url, tmp_path)


@pytest.mark.fleet
def test_concurrency_quickstart_runs(redis_url: str, tmp_path: Path) -> None:
    """partner_tasks.py from the README: 8 bodies of 0.3 s through concurrency 2 on 4 pool processes."""
    run_celery_quickstart(sys.executable, redis_url, tmp_path, "concurrency", "partner_tasks", "call_partner", 8, 1.2)


def run_celery_quickstart(
    python: str, redis_url: str, tmp_path: Path, block: str = "celery", module: str = "tasks",
    task: str = "fetch_repo", count: int = 30, at_least: float = 2.5,
) -> None:  # fmt: skip
    """The README's Celery quickstart with ``python`` (this venv's, or a fresh
    one's that installed the built wheel: ``tests/test_package.py``): ``count``
    calls of ``task`` take ``at_least`` seconds."""
    (tmp_path / f"{module}.py").write_text(quickstart(block))
    env = dict(os.environ, REDIS_URL=redis_url, PYTHONPATH=str(tmp_path))
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [python, "-m", "celery", "-A", module, "worker", "--concurrency", "4", "--without-mingle",
         "--without-gossip", "-l", "warning"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        code = (
            f"import time; from {module} import {task}; t = time.monotonic(); "
            f"r = [{task}.delay(f'r{{i}}') for i in range({count})]; "
            "print([x.get(timeout=60) for x in r]); print(time.monotonic() - t)"
        )
        result = subprocess.run(
            [python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, result.stderr + (tmp_path / "worker.log").read_text()
        names, elapsed = result.stdout.strip().splitlines()
        assert names == str([f"r{i}" for i in range(count)])
        # 30 calls at 10/s with a burst of 5 need at least 2.5 s; 8 of 0.3 s two at a time, 1.2 s.
        assert float(elapsed) >= at_least - 0.05
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        log.close()


@pytest.mark.slow
def test_pytest_example_runs(tmp_path: Path) -> None:
    """The README's example test file, in a project of its own: throttle's
    plugin (an entry point of the package) gives its fixtures beside Celery's."""
    (tmp_path / "test_tasks.py").write_text(quickstart("pytest"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tasks.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and "2 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
