"""Releasing parked tasks: a thread in every worker's main process.

Every worker of the fleet runs one ``Releaser`` (started when the worker is
ready, stopped at shutdown): no extra service to run, and no single point of
failure.  Each tick it asks the index which rooms have tasks due within
``RELEASE_AHEAD_S``, and for each room:

- the room's limit is paused: leave it shut, look again in a few seconds;
- the limit changed since the room was planned (``throttle set``, ``unset``,
  ``reset``): re-plan the room at the limit in force (``WaitingRoom.replan``),
  so a raised limit drains it faster at once;
- claim what is due (atomically: two releasers never take the same entry),
  publish each task with the countdown left to its slot, acknowledge.

A releaser killed between its claim and its acknowledgement loses nothing:
the claim expires after ``CLAIM_HOLD_S`` and another releaser publishes the
entries again.  Each publish carries its own copy id (``HEADER_RELEASED``,
with the park's own id, ``HEADER_PARKED``); the gate runs the first copy of
a park's release that arrives and drops any other
(``WaitingRoom.first_arrival``): at least once out of Redis, once into the body.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from celery import Celery
from redis.exceptions import RedisError

from ..keys import limit_of
from ..live_state import InForce, LiveState
from ..room import Parked, persistence_warning
from .deferral import HEADER_ETA, HEADER_PARKED, HEADER_RELEASED
from .gate import LEAD_S
from .parking import unpack
from .runtime import Runtime, runtime_for

__all__ = ["Releaser", "RELEASE_AHEAD_S", "CLAIM_HOLD_S", "TICK_S", "IDLE_TICK_S", "start_releaser", "stop_releaser"]

logger = logging.getLogger("throttle")

#: Tasks are released this long before their slot: broker and prefetch
#: latency.  They wait the rest as a countdown in a worker (a few seconds'
#: worth of tasks, not the backlog).
RELEASE_AHEAD_S = 2.0

#: A claim not acknowledged within this long is given back (the releaser died).
CLAIM_HOLD_S = 30.0

#: How often a releaser looks for due rooms while there are some, and while
#: there were none (well within RELEASE_AHEAD_S, so nothing is released late).
TICK_S = 0.25
IDLE_TICK_S = 1.0

#: A paused room is looked at again this often (a ``throttle resume`` opens it within that).
_PAUSED_LOOK_S = 2.0

#: At most this many entries per claim, and rooms per tick.
_CLAIM_BATCH = 500
_ROOMS_PER_TICK = 200

#: How hard one release publish tries before the entry is left to come back.
_RELEASE_RETRY = {"max_retries": 3, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 1.0}


class Releaser:
    """Publishes the parked tasks that are due, for one app, from one process."""

    def __init__(self, app: Celery, runtime: Runtime | None = None) -> None:
        self.app = app
        self.runtime = runtime or runtime_for(app)
        self.room = self.runtime.room
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released = 0
        self._busy = False  # rooms were due at the last look: look again soon
        self._seen: dict[str, int] = {}  # the version of each limit this releaser last re-planned for

    def start(self) -> None:
        warning = _persistence(self.runtime)
        if warning:
            logger.warning("throttle waiting room: %s", warning)
        self._thread = threading.Thread(target=self._run, name="throttle-releaser", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self._next_wait(failures)):
            try:
                self.tick()
                failures = 0
            except (RedisError, OSError) as exc:
                failures += 1
                logger.warning("throttle releaser: %s (retrying)", exc)
            except Exception:  # never let the thread die: parked tasks depend on it
                failures += 1
                logger.exception("throttle releaser failed; retrying")

    def _next_wait(self, failures: int) -> float:
        if failures:
            return float(min(10.0, TICK_S * 2**failures))
        return TICK_S if self._busy else IDLE_TICK_S

    def tick(self) -> int:
        """Release what is due in every room now; how many tasks were published."""
        state = self.runtime.live.state()
        self._replan_changed(state)
        _, rooms = self.room.due(RELEASE_AHEAD_S, _ROOMS_PER_TICK)
        self._busy = bool(rooms)
        published = 0
        for room in rooms:
            in_force = self._in_force(state, limit_of(room))
            if in_force.pause_left > 0:
                self.room.reindex(room, state.now() + min(in_force.pause_left, _PAUSED_LOOK_S))
                continue
            self._replan(room, in_force)
            published += self._release(room)
        self.released += published
        return published

    def _in_force(self, state: LiveState, name: str) -> InForce:
        return state.in_force(name, self.runtime.settings.limits.get(name))

    def _replan_changed(self, state: LiveState) -> None:
        """After a live change, re-plan every room of that limit, due or not.

        A room whose first release is hours away is not in the due list, and
        a raised limit must drain it now.  Each releaser looks once per
        version it sees (and at its start, for changes made while it was down).
        """
        for name in sorted(state.names() | set(self.runtime.settings.limits)):
            in_force = self._in_force(state, name)
            if in_force.change_in > 0 or self._seen.get(name) == in_force.version:
                continue
            self._seen[name] = in_force.version
            for room in self.room.rooms(name):
                self._replan(room, in_force)

    def _replan(self, room: str, in_force: InForce) -> None:
        planned = self.room.planned_version(room)
        changed = planned is not None and planned != in_force.version and in_force.change_in == 0
        if changed and in_force.limit is not None:
            count = self.room.replan(room, in_force.version, in_force.limit)
            logger.info("throttle: %s is at version %d: re-planned %d parked tasks of %r",
                        in_force.name, in_force.version, count, room)  # fmt: skip

    def _release(self, room: str) -> int:
        claim = self.room.claim(room, RELEASE_AHEAD_S, CLAIM_HOLD_S, _CLAIM_BATCH)
        done: list[str] = []
        started = time.monotonic()
        try:
            with self.app.producer_or_acquire() as producer:
                for parked in claim.parked:
                    now = claim.now + (time.monotonic() - started)
                    if self.publish(room, parked, now, producer):
                        done.append(parked.entry)
        finally:
            self.room.ack(room, done)
            # After the ack: the claims just acknowledged no longer hold the
            # room in the index (an empty room leaves no key behind).
            self.room.settle(room)
        if done:
            logger.debug("throttle: released %d parked tasks of %s", len(done), room)
            if self.runtime.metrics is not None:
                self.runtime.metrics.count([limit_of(room)], "released", len(done))
        return len(done)

    def publish(self, room: str, parked: Parked, now: float, producer: Any) -> bool:
        """Publish one parked task to arrive at its release time; False: it stays claimed (and comes back)."""
        try:
            signature = unpack(self.app, parked.message)
        except (ValueError, TypeError) as exc:
            # Not ours, or written by a newer throttle: keep it for an operator to look at.
            logger.error("throttle: cannot release %s from %s: %s (left claimed)", parked.entry, room, exc)
            return False
        countdown = max(0.0, parked.release_at - now - LEAD_S)
        headers = dict(signature.options.get("headers") or {})
        headers[HEADER_ETA] = round(now + countdown, 6)
        headers[HEADER_RELEASED] = [room, str(headers.get(HEADER_PARKED, "")), uuid.uuid4().hex]
        try:
            signature.apply_async(
                countdown=countdown, headers=headers, producer=producer, retry=True, retry_policy=_RELEASE_RETRY
            )
        except Exception as exc:  # the broker: the claim expires and another releaser tries
            logger.warning("throttle: could not publish parked %s of %s: %s", parked.entry, room, exc)
            return False
        return True


def _persistence(runtime: Runtime) -> str | None:
    try:
        return persistence_warning(runtime.redis)
    except RedisError as exc:
        return f"could not check persistence: {exc}"


_releasers: dict[int, Releaser] = {}


def start_releaser(app: Celery) -> Releaser | None:
    """Start this process's releaser for ``app`` (once); None if throttle is not configured."""
    if id(app) in _releasers:
        return _releasers[id(app)]
    try:
        runtime = runtime_for(app)
    except ValueError as exc:
        logger.warning("throttle waiting room not started: %s", exc)
        return None
    if runtime.settings.park_after is None:
        return None
    releaser = Releaser(app, runtime)
    releaser.start()
    _releasers[id(app)] = releaser
    return releaser


def stop_releaser(app: Celery) -> None:
    releaser = _releasers.pop(id(app), None)
    if releaser is not None:
        releaser.stop()
