"""The distribution as a user gets it: built, checked, installed by name into
a fresh virtualenv, and the README's Celery quickstart run from there with a
real worker.

Building takes setuptools from the package index (``python -m build`` builds
in isolation) and the fresh venv takes Celery and the rest from it too.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet import ROOT
from tests.test_readme import run_celery_quickstart

pytestmark = [pytest.mark.slow]

DIST_NAME = "celery-fleet-throttle"


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = _run(sys.executable, "-m", "build", "--outdir", str(out), str(ROOT))
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fresh_python(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A new virtualenv with nothing but the built wheel, its ``testing`` extra and their dependencies."""
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(home)
    python = str(home / "bin" / "python")
    (wheel,) = dist.glob("*.whl")
    installed = _run(python, "-m", "pip", "install", "--disable-pip-version-check", "-q", f"{wheel}[testing]")
    assert installed.returncode == 0, installed.stderr[-3000:]
    yield python


def test_the_distribution_is_the_library_only(dist: Path) -> None:
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    assert wheels[0].name.startswith("celery_fleet_throttle-")
    checked = _run(sys.executable, "-m", "twine", "check", "--strict", *map(str, [*wheels, *sdists]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    names = zipfile.ZipFile(wheels[0]).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    info = next(t for t in tops if t.endswith(".dist-info"))
    assert tops == {"throttle", "redis_token_bucket.py", info}, tops
    assert {"throttle/lua/gcra.lua", "throttle/py.typed", f"{info}/licenses/LICENSE"} <= set(names)
    metadata = zipfile.ZipFile(wheels[0]).read(f"{info}/METADATA").decode()
    assert f"Name: {DIST_NAME}" in metadata and "License-Expression: MIT" in metadata
    assert "Requires-Dist: celery[redis]>=5.3" in metadata


@pytest.mark.fleet
def test_a_fresh_venv_runs_the_readme_quickstart(fresh_python: str, redis_url: str, tmp_path: Path) -> None:
    shown = _run(fresh_python, "-m", "pip", "show", DIST_NAME)
    assert shown.returncode == 0 and f"Name: {DIST_NAME}" in shown.stdout
    for module in ("worker", "producer", "tests"):
        imported = subprocess.run(
            [fresh_python, "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert imported.returncode != 0 and "No module named" in imported.stderr, f"{module} was installed"
    version = _run(str(Path(fresh_python).parent / "throttle"), "--version")
    assert version.returncode == 0 and "throttle, version" in version.stdout
    run_celery_quickstart(fresh_python, redis_url, tmp_path)


@pytest.mark.fleet
def test_the_testing_extra_brings_the_fixtures(fresh_python: str, tmp_path: Path) -> None:
    """``pytest --fixtures`` in a project of its own lists throttle's fixtures
    next to Celery's, and the README's example test passes there."""
    from tests.test_readme import quickstart

    listed = subprocess.run(
        [fresh_python, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    names = {line.split(" ", 1)[0] for line in listed.stdout.splitlines()}
    assert {"throttle_celery_config", "throttle_decisions", "throttle_unthrottled_config"} <= names, listed.stdout
    assert {"celery_app", "celery_config"} <= names
    (tmp_path / "test_tasks.py").write_text(quickstart("pytest"))
    ran = subprocess.run(
        [fresh_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tasks.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert ran.returncode == 0 and "2 passed" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-2000:]
