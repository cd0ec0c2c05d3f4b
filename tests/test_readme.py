"""The README's quickstarts run as written (against the test Redis)."""

from __future__ import annotations

import re
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


def test_bucket_quickstart_runs(redis_url: str, tmp_path: Path) -> None:
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart("bucket"))
    result = subprocess.run(
        [sys.executable, str(script)],
        env={"REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "call the API; 4 tokens left" in result.stdout
    assert "my slot is in" in result.stdout


def test_original_example_names_exist() -> None:
    import redis_token_bucket

    assert redis_token_bucket.RedisTokenBucket.__init__.__code__.co_varnames[1:5] == (
        "redis_client",
        "key",
        "burst_rate",
        "replenishment_rate",
    )
