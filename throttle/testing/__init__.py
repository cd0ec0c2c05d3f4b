"""Real parts for tests, benchmarks and the demo: no mocks.

- ``redis_server``: a private ``redis-server`` on a free loopback port;
- ``cluster``: a private Redis Cluster of N masters;
- ``processes``: child processes in their own sessions, stopped by pid;
- ``windows``: events counted in time windows (the limit's promise, measured).

Nothing here is needed in production.
"""

from __future__ import annotations

from .cluster import EmbeddedCluster
from .processes import Children, Closing, spawn, stop_groups
from .redis_server import RedisServer, find_redis_server, free_port
from .windows import Segment, Violation, peak_in_window, per_second, violations

__all__ = [
    "Children",
    "Closing",
    "EmbeddedCluster",
    "RedisServer",
    "find_redis_server",
    "free_port",
    "Segment",
    "Violation",
    "peak_in_window",
    "per_second",
    "spawn",
    "stop_groups",
    "violations",
]
