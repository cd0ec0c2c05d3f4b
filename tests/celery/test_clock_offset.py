"""A worker's offset to the Redis clock: what turns a deferral's Redis-time ETA into this host's time.

An error here moves every deferred task's arrival: too early and it goes
round the broker again, too late and it forfeits its slot.
"""

from __future__ import annotations

import time

import pytest
from celery import Celery

from throttle.celery import request as request_module
from throttle.celery.request import ClockOffset
from throttle.testing.redis_server import free_port


class _SlowReplies:
    """A TIME that is read at once, then delivered late by a given delay (a busy worker's GIL or CPU)."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = list(delays)

    def time(self) -> tuple[int, int]:
        now = time.time()
        time.sleep(self.delays.pop(0))
        return int(now), int((now % 1) * 1e6)


def _offset_with(delays: list[float]) -> float | None:
    offset = ClockOffset(Celery(set_as_current=False))
    offset._client = _SlowReplies(delays)
    return offset.measure()


def test_the_shortest_round_trip_decides() -> None:
    """One late reply among five moves the offset by half its delay; the best of five does not."""
    value = _offset_with([0.08, 0.001, 0.06, 0.05, 0.07])
    assert value is not None
    assert abs(value) < 0.01, f"offset {value * 1000:.1f} ms; the 1 ms round trip says about 0"


def test_a_single_sample_would_be_off_by_half_its_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why several samples: with one, an 80 ms late reply puts arrivals ~40 ms early."""
    monkeypatch.setattr(request_module, "_SAMPLES", 1)
    value = _offset_with([0.08])
    assert value is not None and value < -0.03


def test_same_host_offset_is_about_zero(redis_url: str) -> None:
    """This host and its own redis-server share a clock: within 20 ms even on a busy machine."""
    app = Celery(set_as_current=False)
    app.conf.throttle_redis_url = redis_url
    offset = ClockOffset(app)
    try:
        value = offset.measure()
    finally:
        if offset._client is not None:
            offset._client.close()
    assert value is not None and abs(value) < 0.02


def test_no_redis_keeps_the_last_known_offset() -> None:
    """Redis unreachable: no exception into the worker, the last value (none yet) stands."""
    app = Celery(set_as_current=False)
    app.conf.throttle_redis_url = f"redis://127.0.0.1:{free_port()}/0"
    offset = ClockOffset(app)
    try:
        assert offset.measure() is None
        offset.value = 0.25
        assert offset.measure() == 0.25
    finally:
        if offset._client is not None:
            offset._client.close()
