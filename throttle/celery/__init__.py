"""Celery integration: ``ThrottledTask`` and the settings, options and gate behind it.

- ``settings``: the ``throttle_*`` Celery settings, read and checked per app;
- ``options``: a task's ``throttle*`` options, resolved against them;
- ``runtime``: per worker process, the Redis client, live limits and buckets;
- ``gate``: the decision before each body (run, or defer to a booked slot);
- ``deferral``: how a deferred task travels (headers, reasons, the re-send);
- ``parking``/``release``: long waits parked in the waiting room (``throttle.room``), released by every worker;
- ``task``: ``ThrottledTask``, the base class;
- ``signals``: what the gate tells monitors.
"""

from __future__ import annotations

from ..errors import ThrottleDeferralExpired
from .deferral import HEADER_DEFERRALS, HEADER_RETRIES, HEADER_SINCE, HEADER_SLOT, HEADER_VERSIONS, DeferralReason
from .gate import EPSILON_S, GRACE_S, SPIN_S
from .task import ThrottledTask

__all__ = [
    "ThrottledTask",
    "ThrottleDeferralExpired",
    "DeferralReason",
    "HEADER_DEFERRALS",
    "HEADER_SLOT",
    "HEADER_SINCE",
    "HEADER_VERSIONS",
    "HEADER_RETRIES",
    "GRACE_S",
    "EPSILON_S",
    "SPIN_S",
]
