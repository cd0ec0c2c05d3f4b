"""Fleet-wide counters of the gate's decisions, kept in Redis for the demo.

Connected to throttle's signals in every worker process: one HINCRBY per
decision into ``<prefix>:~demo:stats``, so the demo can show deferrals per
task for the whole fleet.  (A production fleet would export metrics instead.)
"""

from __future__ import annotations

from typing import Any

import redis
from celery.signals import worker_ready

from throttle import keys
from throttle.celery.settings import settings_for
from throttle.celery.signals import backend_error, limit_paused, task_admitted, task_deferred
from throttle.connect import client_from_url

from .app import app

_client: Any = None

#: The counters outlive a demo run by a day, then go.
STATS_TTL_S = 86400


def stats_key() -> str:
    return keys.stats_key(settings_for(app).prefix)


def _redis() -> Any:
    """The buckets' Redis (one server, a cluster or a Sentinel master)."""
    global _client
    if _client is None:
        _client = client_from_url(settings_for(app).redis_url, socket_timeout=2, socket_connect_timeout=2)
    return _client


def _bump(*fields: str) -> None:
    try:
        pipe = _redis().pipeline(transaction=False)
        for field in fields:
            pipe.hincrby(stats_key(), field, 1)
        pipe.expire(stats_key(), STATS_TTL_S)  # no key lives forever
        pipe.execute()
    except redis.RedisError:
        pass  # counters are best effort; the gate itself reports Redis errors


@task_admitted.connect
def _admitted(sender: Any = None, paid: str = "", **kwargs: Any) -> None:
    _bump("admitted", f"admitted:{paid}")


@task_deferred.connect
def _deferred(sender: Any = None, reason: str = "", **kwargs: Any) -> None:
    _bump("deferred", f"deferred:{reason}")


@limit_paused.connect
def _paused(sender: Any = None, **kwargs: Any) -> None:
    _bump("paused")


@backend_error.connect
def _backend_error(sender: Any = None, **kwargs: Any) -> None:
    _bump("backend_error")


@worker_ready.connect
def _ready(sender: Any = None, **kwargs: Any) -> None:
    """Lets whoever started the fleet know this worker consumes now."""
    _bump("workers_ready")
