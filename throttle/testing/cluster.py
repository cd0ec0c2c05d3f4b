"""A private Redis Cluster of N masters on loopback, for tests and benchmarks.

Each master is a ``RedisServer`` started with ``--cluster-enabled yes``; the
slots are split evenly and the nodes introduced to each other with plain
cluster commands (``CLUSTER ADDSLOTS``, ``CLUSTER MEET``), so neither
``redis-cli`` nor a fixed port is needed.  Stopped by pid, like the servers.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import redis

from .processes import Closing
from .redis_server import RedisServer

__all__ = ["EmbeddedCluster", "SLOTS"]

SLOTS = 16384


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class EmbeddedCluster(Closing):
    """``masters`` redis-server processes forming one cluster; a context manager."""

    def __init__(self, masters: int = 3, binary: str | None = None) -> None:
        if masters < 1:
            raise ValueError(f"masters must be at least 1, got {masters!r}")
        self.servers = [
            RedisServer(
                port=_cluster_port(),
                binary=binary,
                extra_args=["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"],
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """A ``redis+cluster://`` URL naming the first node (it discovers the rest)."""
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}/0"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.servers]

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        for server in self.servers:
            server.start()
        clients: list[Any] = [redis.Redis(port=s.port) for s in self.servers]  # untyped execute_command
        try:
            share = SLOTS // len(self.servers)
            for i, client in enumerate(clients):
                first = i * share
                last = SLOTS - 1 if i == len(clients) - 1 else first + share - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.servers[0].port)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                infos = [c.execute_command("CLUSTER INFO") for c in clients]
                states = [_field(info, "cluster_state") for info in infos]
                known = [_field(info, "cluster_known_nodes") for info in infos]
                if all(s == "ok" for s in states) and all(k == str(len(clients)) for k in known):
                    return self
                time.sleep(0.1)
        finally:
            for client in clients:
                client.close()
        self.close()
        raise RuntimeError(f"cluster of {len(self.servers)} nodes not ok within {timeout}s")

    def close(self) -> None:
        for server in self.servers:
            server.close()


def _field(info: object, name: str) -> str:
    """One field of CLUSTER INFO (a dict from redis-py, or the raw text)."""
    if isinstance(info, dict):
        return str(info.get(name, ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return ""
