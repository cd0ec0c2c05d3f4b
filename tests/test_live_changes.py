"""Live changes of one limit take effect one after the other, on every worker alike.

A change is scheduled ``CHANGE_DELAY_S`` ahead so that every worker (whose
reading of the live state is at most ``REFRESH_S`` old) switches at the same
Redis time.  A second change made while the first is pending must not be
scheduled over it: a worker that read the state between the two would switch
to the first change while fresher workers keep the limit before it, and the
fleet would run two buckets at once (the long model-based runs found this:
19 starts in 0.9 s where 18.5 were allowed).  So it waits.
"""

from __future__ import annotations

import itertools
import json
import threading
import time

import redis

from throttle.live import CHANGE_DELAY_S, LiveLimits, Override


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


def test_a_change_waits_until_the_pending_one_is_in_force(r: redis.Redis, prefix: str) -> None:
    live = LiveLimits(r, prefix)
    assert live.set("api", rate="5/s") == 1
    first_at = live.read().pending["api"].at
    assert live.set("api", rate="20/s", burst=3) == 2
    made = redis_now(r)
    assert made >= first_at, "the second change was made before the first took effect"
    state = live.read()
    now = state.in_force("api", None)
    assert (now.version, now.override) == (1, Override("5/s")), "the first change is in force"
    pending = state.pending["api"]
    assert (pending.version, pending.override) == (1, Override("5/s"))
    assert made + CHANGE_DELAY_S - 0.05 <= pending.at <= made + CHANGE_DELAY_S + 0.05
    scheduled = state.in_force("api", None, scheduled=True)
    assert (scheduled.version, scheduled.override) == (2, Override("20/s", 3))


def test_a_reset_right_after_a_set_keeps_the_order(r: redis.Redis, prefix: str) -> None:
    live = LiveLimits(r, prefix)
    live.set("api", rate="5/s")
    assert live.bump("api") == 2
    assert live.unset("api")
    state = live.read()
    assert state.pending["api"].version == 2 and state.pending["api"].override == Override("5/s")
    assert "api" not in state.overrides and state.versions["api"] == 3


def test_concurrent_changes_each_take_effect_in_turn(r: redis.Redis, prefix: str) -> None:
    live = LiveLimits(r, prefix)
    versions: list[int] = []
    made: list[float] = []
    lock = threading.Lock()

    def change(rate: int) -> None:
        version = LiveLimits(redis.Redis(connection_pool=r.connection_pool), prefix).set("api", rate=f"{rate}/s")
        with lock:
            versions.append(version)
            made.append(redis_now(r))

    threads = [threading.Thread(target=change, args=(n,)) for n in (1, 2, 3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(versions) == [1, 2, 3]
    made.sort()
    gaps = [b - a for a, b in itertools.pairwise(made)]
    assert all(gap >= CHANGE_DELAY_S - 0.05 for gap in gaps), gaps
    assert time.monotonic() - started >= 2 * CHANGE_DELAY_S - 0.05
    assert live.read().versions["api"] == 3


def test_unset_without_an_override_changes_nothing(r: redis.Redis, prefix: str) -> None:
    live = LiveLimits(r, prefix)
    assert not live.unset("api")
    assert live.read().versions == {} and live.read().pending == {}


def test_set_merges_into_a_hand_written_override(r: redis.Redis, prefix: str) -> None:
    live = LiveLimits(r, prefix)
    r.hset(live.overrides_key, "api", json.dumps({"burst": 4, "rate": "2/s"}))
    live.set("api", mode="shadow")
    assert live.read().overrides["api"] == Override("2/s", 4, "shadow")


def test_a_decisions_redis_time_says_which_version_it_was_made_under(r: redis.Redis, prefix: str) -> None:
    """A reading taken before a change, used by a process that lagged past the
    change's moment, must not decide by the old version: the gate asks
    ``in_force(at=<the decision's Redis time>)`` (``Gate._change_near``)."""
    live = LiveLimits(r, prefix)
    live.set("api", rate="5/s")
    state = live.read()
    at = state.pending["api"].at
    assert state.in_force("api", None).version == 0, "now: the change is still ahead"
    assert state.in_force("api", None, at=at - 0.001).version == 0
    after = state.in_force("api", None, at=at + 0.001)
    assert (after.version, after.override) == (1, Override("5/s")), "at the decision's time: the new limit"
