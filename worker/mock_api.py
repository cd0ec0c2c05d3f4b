"""A rate-limited outbound API to aim a fleet at: ``python -m worker.mock_api``.

A real HTTP server (standard library, one thread per connection) that
enforces its own token bucket, answers 429 with ``Retry-After`` when a caller
goes over it, and records every request (time, task id, worker, status).

- ``POST /call``: one call; 200 ``{"ok": true}`` or 429 with ``Retry-After``
  (seconds, fractional: a 20/s API's next slot is 0.05 s away).
- ``GET /stats``: counters as JSON (requests, ok, 429s, distinct task ids,
  peak requests in any 1 s window, per-second counts).
- ``GET /requests``: every request recorded, as JSON.
- ``POST /reset``: forget everything (a new run).
- ``GET /health``: 200 when up.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from throttle.testing.windows import peak_in_window, per_second

__all__ = ["ApiLimiter", "MockApi", "main"]


class ApiLimiter:
    """The API's own limit: a token bucket (``burst`` deep) or a sliding window.

    Kept in this process with a lock: the API is one server, so its own
    clock is the one that matters.
    """

    def __init__(self, rate: float, burst: int, mode: str = "bucket") -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"the API's limit needs rate > 0 and burst >= 1, got rate={rate} burst={burst}")
        if mode not in ("bucket", "window"):
            raise ValueError(f"mode must be 'bucket' or 'window', got {mode!r}")
        self.rate, self.burst, self.mode = rate, burst, mode
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._window: list[float] = []

    def take(self) -> float:
        """0.0 if the call is allowed (and counted), else seconds until it would be."""
        with self._lock:
            now = time.monotonic()
            if self.mode == "window":
                # At most rate + burst calls in any 1 s.
                cap = int(self.rate + self.burst)
                self._window = [t for t in self._window if now - t < 1.0]
                if len(self._window) < cap:
                    self._window.append(now)
                    return 0.0
                return 1.0 - (now - self._window[0])
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            # A hair of tolerance for float rounding, not for bursts.
            if self._tokens >= 1.0 - 1e-9:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate


@dataclass
class Request:
    t: float
    task_id: str
    worker: str
    status: int


class MockApi:
    """The server and its records; ``serve()`` blocks, ``start()`` runs it in a thread."""

    def __init__(self, host: str, port: int, limiter: ApiLimiter, latency: float = 0.0) -> None:
        self.limiter = limiter
        self.latency = latency
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.started = time.time()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # every request is recorded; no access log on stderr

            def _reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._reply(200, {"ok": True})
                elif self.path == "/stats":
                    self._reply(200, api.stats())
                elif self.path == "/requests":
                    with api.lock:
                        self._reply(200, [r.__dict__ for r in api.requests])
                else:
                    self._reply(404, {"error": f"no such path {self.path}"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                if self.path == "/reset":
                    api.reset()
                    self._reply(200, {"ok": True})
                    return
                if self.path != "/call":
                    self._reply(404, {"error": f"no such path {self.path}"})
                    return
                now = time.time()
                wait = api.limiter.take()
                status = 200 if wait == 0 else 429
                with api.lock:
                    api.requests.append(
                        Request(now, self.headers.get("X-Task-Id", ""), self.headers.get("X-Worker", ""), status)
                    )
                if status == 429:
                    # Round up to the millisecond: never tell a caller too early.
                    retry_after = f"{math.ceil(wait * 1000) / 1000:.3f}"
                    self._reply(429, {"error": "rate limited", "retry_after": float(retry_after)},
                                {"Retry-After": retry_after})  # fmt: skip
                    return
                if api.latency:
                    time.sleep(api.latency)
                self._reply(200, {"ok": True})

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.started = time.time()

    def stats(self) -> dict[str, Any]:
        with self.lock:
            requests = list(self.requests)
        times = [r.t for r in requests]
        ok = [r for r in requests if r.status == 200]
        start = min(times) if times else self.started
        return {
            "limit": {"rate": self.limiter.rate, "burst": self.limiter.burst, "mode": self.limiter.mode},
            "requests": len(requests),
            "ok": len(ok),
            "http_429": len(requests) - len(ok),
            "task_ids_ok": len({r.task_id for r in ok}),
            "duplicate_ok": len(ok) - len({r.task_id for r in ok}),
            "peak_1s": peak_in_window(times),
            "first": min(times) if times else None,
            "last": max(times) if times else None,
            "per_second": per_second(times, start),
            "per_second_429": per_second([r.t for r in requests if r.status == 429], start),
            "workers": len({r.worker for r in requests}),
        }

    def serve(self) -> None:
        self.server.serve_forever(poll_interval=0.1)

    def start(self) -> MockApi:
        self._thread = threading.Thread(target=self.serve, name="mock-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.mock_api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--rate", default="20/s", help="the API's own limit, e.g. 20/s or 600/m (default 20/s)")
    parser.add_argument("--burst", type=int, default=5, help="the API's burst (default 5)")
    parser.add_argument("--mode", choices=("bucket", "window"), default="bucket", help="token bucket or 1 s window")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds each allowed call takes (default 0)")
    args = parser.parse_args(argv)
    from throttle.limit import parse_rate

    try:
        limiter = ApiLimiter(parse_rate(args.rate), args.burst, args.mode)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    api = MockApi(args.host, args.port, limiter, args.latency)
    print(f"mock API on http://{args.host}:{api.port} limit {args.rate} burst {args.burst} ({args.mode})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        api.serve()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        api.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
