"""The reference worker's configuration, from environment variables only.

| variable | default | meaning |
|---|---|---|
| BROKER_URL | redis://localhost:6379/0 | Celery broker (Redis or RabbitMQ `amqp://`) |
| THROTTLE_REDIS_URL | the broker, if Redis | where the shared buckets live |
| THROTTLE_LIMITS | `{"api": {"rate": "20/s", "burst": 5}}` | JSON, as the `throttle_limits` setting |
| THROTTLE_PREFIX | throttle | key prefix in Redis |
| THROTTLE_ON_BACKEND_ERROR | defer | defer, allow or fail when Redis is down |
| THROTTLE_MAX_DEFER | 2592000 (30 days) | seconds a task may wait in total |
| THROTTLE_MAX_COUNTDOWN | 600 | longest single countdown; longer waits travel in hops |
| THROTTLE_PARK_AFTER | 60 | waits longer than this park in the waiting room (Redis); `off`: never |
| WORKER_QUEUE | throttle-demo | the queue the example tasks use |
| API_URL | http://127.0.0.1:8080 | the outbound API the example tasks call |
| API_TIMEOUT | 10 | seconds per HTTP request |
| RESULT_BACKEND | (none) | store results (the producer's `--wait` needs it) |
| RESULT_SERIALIZER | (Celery's: json) | how results and errors are stored: json or pickle |
| BROKER_VISIBILITY_TIMEOUT | (Celery's: 3600) | Redis broker: seconds before an unacked message is delivered again |
| BUILTIN_RATE_LIMIT | (none) | Celery's own per-worker `rate_limit` for `worker.call_api_unthrottled`, for comparison |
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from throttle.celery.settings import DEFAULT_MAX_DEFER, DEFAULT_PARK_AFTER

DEFAULT_LIMITS = {"api": {"rate": "20/s", "burst": 5}}


def worker_env(
    broker_url: str, throttle_redis_url: str, limits: Mapping[str, Any], prefix: str, queue: str, **extra: str
) -> dict[str, str]:
    """The environment of a reference worker process: this one's, plus the
    variables above (the demo and the fleet tests start workers with it)."""
    env = dict(os.environ)
    env.update(
        BROKER_URL=broker_url,
        THROTTLE_REDIS_URL=throttle_redis_url,
        THROTTLE_LIMITS=json.dumps(limits),
        THROTTLE_PREFIX=prefix,
        WORKER_QUEUE=queue,
        **extra,
    )
    return env


def celery_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Celery settings for the reference worker, read from ``env``."""
    env = os.environ if env is None else env
    broker = env.get("BROKER_URL", "redis://localhost:6379/0")
    raw_limits = env.get("THROTTLE_LIMITS")
    try:
        limits = json.loads(raw_limits) if raw_limits else DEFAULT_LIMITS
    except json.JSONDecodeError as exc:
        raise ValueError(f"THROTTLE_LIMITS must be JSON like {json.dumps(DEFAULT_LIMITS)}: {exc}") from exc
    queue = env.get("WORKER_QUEUE", "throttle-demo")
    config: dict[str, Any] = {
        "broker_url": broker,
        "throttle_limits": limits,
        "throttle_prefix": env.get("THROTTLE_PREFIX", "throttle"),
        "throttle_on_backend_error": env.get("THROTTLE_ON_BACKEND_ERROR", "defer"),
        "throttle_max_defer": float(env.get("THROTTLE_MAX_DEFER", str(DEFAULT_MAX_DEFER))),
        "throttle_park_after": _park_after(env.get("THROTTLE_PARK_AFTER", str(DEFAULT_PARK_AFTER))),
        "throttle_max_countdown": float(env.get("THROTTLE_MAX_COUNTDOWN", "600")),
        "task_default_queue": queue,
        "task_ignore_result": True,
        # Deferred tasks wait in the broker, not in a worker's prefetch.
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
    }
    if env.get("THROTTLE_REDIS_URL"):
        config["throttle_redis_url"] = env["THROTTLE_REDIS_URL"]
    if env.get("BROKER_VISIBILITY_TIMEOUT"):
        raw = env["BROKER_VISIBILITY_TIMEOUT"]
        try:
            timeout = float(raw)
        except ValueError:
            timeout = float("nan")
        if not 0 < timeout < float("inf"):
            raise ValueError(f"BROKER_VISIBILITY_TIMEOUT must be a number of seconds > 0, not {raw!r}")
        config["broker_transport_options"] = {
            "visibility_timeout": timeout,
            # kombu sweeps for abandoned (unacked) messages every
            # interval x throttle seconds, 10 x 10 = 100 s by default: far
            # longer than a short visibility timeout.  Sweep every timeout/5.
            "unacked_restore_interval": max(1, round(timeout / 5)),
            "unacked_restore_throttle": 1,
        }
    if env.get("RESULT_BACKEND"):
        config["result_backend"] = env["RESULT_BACKEND"]
        config["task_ignore_result"] = False
    if env.get("RESULT_SERIALIZER"):
        config["result_serializer"] = env["RESULT_SERIALIZER"]
        config["result_accept_content"] = sorted({env["RESULT_SERIALIZER"], "json"})
    if env.get("BUILTIN_RATE_LIMIT"):
        config["task_annotations"] = {"worker.call_api_unthrottled": {"rate_limit": env["BUILTIN_RATE_LIMIT"]}}
    return config


def _park_after(raw: str) -> float | None:
    if raw.strip().lower() in ("off", "none", "no", "0"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"THROTTLE_PARK_AFTER must be a number of seconds or 'off', not {raw!r}") from None


def api_url(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("API_URL", "http://127.0.0.1:8080").rstrip("/")


def api_timeout(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    return float(env.get("API_TIMEOUT", "10"))
