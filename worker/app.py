"""The reference Celery app: ``celery -A worker.app worker`` or ``python -m worker``."""

from __future__ import annotations

from celery import Celery

from .config import celery_config

app = Celery("throttle-worker", include=["worker.tasks", "worker.stats"])
app.conf.update(celery_config())
