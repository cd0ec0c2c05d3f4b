"""What a worker of a throttled fleet does when it starts and stops.

At start (``worker_ready``, in the worker's main process): publish the
configured limits, so that ``throttle list`` shows an idle fleet's limits and
``throttle pause NAME`` knows them before any task ran; and start the
releaser of the waiting room.  At stop: stop the releaser.  A worker whose
app has no throttled task does neither.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from .leases import start_sweeper, stop_sweeper
from .release import start_releaser, stop_releaser
from .runtime import runtime_for

__all__: list[str] = []

logger = logging.getLogger("throttle")


def _throttled(app: Celery) -> bool:
    return any(getattr(task, "_throttle_plan", None) is not None for task in app.tasks.values())


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is None or not _throttled(app):
        return
    try:
        runtime = runtime_for(app)
    except ValueError as exc:
        logger.warning("throttle not started: %s", exc)
        return
    runtime.publish()
    start_releaser(app)
    start_sweeper(app)


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        stop_releaser(app)
        stop_sweeper(app)


worker_ready.connect(_on_worker_ready, weak=False)
worker_shutdown.connect(_on_worker_shutdown, weak=False)
