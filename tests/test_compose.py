"""docker-compose.yml: valid for docker-compose, and its services work together.

No Docker engine runs here, so the services' own commands run as local
processes with the environment the compose file gives them; only the
hostnames (``redis``, ``api``) are mapped to loopback ports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from throttle.testing.processes import Children
from throttle.testing.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def resolved(env: dict[str, str]) -> dict[str, Any]:
    """The compose file as docker-compose resolves it (variables filled in)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("THROTTLE_REQUIRE_DOCKER_COMPOSE"):
            pytest.fail("docker-compose is required here (THROTTLE_REQUIRE_DOCKER_COMPOSE) but not installed")
        pytest.skip("docker-compose (Debian package docker-compose) is not installed")
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_compose_file_is_valid() -> None:
    config = resolved(dict(os.environ))
    services = config["services"]
    assert set(services) == {"redis", "api", "worker", "metrics", "producer"}
    for name in ("api", "worker", "metrics", "producer"):
        assert services[name]["image"] == "throttle:latest"
    for name in ("redis", "api", "worker"):
        assert "healthcheck" in services[name], name
    assert services["worker"]["environment"]["THROTTLE_REDIS_URL"] == "redis://redis:6379/0"
    assert (ROOT / "Dockerfile").exists()


def _local(command: list[str], mapping: dict[str, str]) -> list[str]:
    installed = {"python": sys.executable, "throttle": str(Path(sys.executable).parent / "throttle")}
    out = [installed.get(command[0], command[0])]
    for arg in command[1:]:
        out.append(mapping.get(arg, arg))
    return out


@pytest.mark.fleet
def test_compose_services_work_together(redis_url: str, tmp_path: Path) -> None:
    queue = f"compose-{uuid.uuid4().hex[:8]}"
    config = resolved(dict(os.environ, TASKS="40", WORKER_QUEUE=queue))
    services = config["services"]
    base = redis_url.rsplit("/", 1)[0]  # redis://127.0.0.1:PORT
    api_port = free_port()

    def environment(service: str) -> dict[str, str]:
        # A prefix of this run's own: the counters start from zero.
        env = dict(os.environ, PYTHONPATH=str(ROOT), THROTTLE_PREFIX=queue)
        for key, given in services[service].get("environment", {}).items():
            local = str(given).replace("redis://redis:6379", base)
            env[key] = local.replace("http://api:8080", f"http://127.0.0.1:{api_port}")
        return env

    with Children(tmp_path / "logs") as children:
        children.spawn("api", _local(services["api"]["command"], {"0.0.0.0": "127.0.0.1", "8080": str(api_port)}),
                       environment("api"), cwd=ROOT)  # fmt: skip
        metrics_port = free_port()
        metrics_command = _local(services["metrics"]["command"], {"9464": str(metrics_port)})
        children.spawn("metrics", [*metrics_command, "--host", "127.0.0.1"], environment("metrics"), cwd=ROOT)
        for i in range(2):
            command = [*services["worker"]["command"], "-n", f"compose{i}-{queue}@%h"]
            children.spawn(f"worker{i}", _local(command, {}), environment("worker"), cwd=ROOT)
        producer = subprocess.run(
            _local(services["producer"]["command"], {}), env=environment("producer"), cwd=ROOT,
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert producer.returncode == 0, producer.stderr[-2000:]
        assert "sent 40 tasks" in producer.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/stats", timeout=5) as response:
            stats = json.loads(response.read())
        admitted = 0.0
        deadline = time.monotonic() + 10  # the workers add their counts once a second
        while admitted < 40 and time.monotonic() < deadline:
            time.sleep(0.5)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                lines = response.read().decode().splitlines()
            admitted = sum(
                float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith('throttle_admitted_total{limit="api"')
            )
        assert children.dead() == []
        assert admitted == 40
    assert stats["ok"] == 40 and stats["task_ids_ok"] == 40
    assert stats["http_429"] == 0
    assert stats["peak_1s"] <= 25
