"""Example tasks that call a rate-limited outbound HTTP API.

Each call sends the task id and the worker's host and pid, so the API's own
log can tell which worker sent what.  A 429 becomes ``RateLimited``: the
whole fleet pauses for the API's ``Retry-After`` and the task is deferred,
not failed.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any

from throttle import RateLimited
from throttle.celery import ThrottledTask

from .app import app
from .config import api_timeout, api_url

HOST = socket.gethostname()


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 1.0
    except ValueError:
        return 1.0


def call(path: str, task_id: str | None, payload: dict[str, Any]) -> dict[str, Any]:
    """POST ``payload`` to the API; RateLimited on 429, an exception on other errors."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(
        f"{api_url()}{path}",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-Task-Id": task_id or "",
            "X-Worker": f"{HOST}:{os.getpid()}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=api_timeout()) as response:
            result: dict[str, Any] = json.loads(response.read() or b"{}")
            return result
    except urllib.error.HTTPError as exc:
        if exc.code == 429:
            raise RateLimited(retry_after=_retry_after(exc.headers.get("Retry-After"))) from exc
        raise


@app.task(bind=True, base=ThrottledTask, throttle="api", name="worker.call_api")
def call_api(self: ThrottledTask, n: int) -> dict[str, Any]:
    """One call to the API under the fleet-wide "api" limit."""
    return call("/call", self.request.id, {"n": n})


def _tenant(n: int, tenant: str) -> str:
    return tenant


@app.task(bind=True, base=ThrottledTask, throttle="api", throttle_key=_tenant, name="worker.call_api_for")
def call_api_for(self: ThrottledTask, n: int, tenant: str) -> dict[str, Any]:
    """One call on behalf of ``tenant``: each tenant has its own "api" bucket."""
    return call("/call", self.request.id, {"n": n, "tenant": tenant})


@app.task(name="worker.call_api_unthrottled", bind=True, max_retries=None)
def call_api_unthrottled(self: Any, n: int) -> dict[str, Any]:
    """The same call limited only by Celery's own per-worker ``rate_limit``
    (``BUILTIN_RATE_LIMIT``), retrying after a 429 the usual Celery way."""
    try:
        return call("/call", self.request.id, {"n": n})
    except RateLimited as exc:
        raise self.retry(countdown=exc.retry_after, exc=exc) from exc
