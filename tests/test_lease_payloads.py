"""lease.lua's side for parked Celery tasks: payloads kept until taken up, lost hand-overs re-queued.

A parked task is not a process that waits: its payload (its message) is all
there is of it.  These tests drive the script directly (a real redis-server)
the way ``throttle.celery.leases`` does, with short holds.
"""

from __future__ import annotations

import time

import pytest
import redis

from throttle.keys import LeaseKeys
from throttle.semaphore import LeaseMode, LeaseReply, Semaphore


class Raw(Semaphore):
    """A semaphore whose calls take a payload and return the raw reply (handed-over payloads included)."""

    handover_hold = 0.3

    def do(
        self, mode: LeaseMode, lease_id: str = "", payload: bytes = b"", stay: float = 60.0, hand_over: bool = True
    ) -> LeaseReply:
        args = self._args(mode, lease_id, about="test", stay=stay, payload=payload, hand_over=hand_over)
        return LeaseReply.parse(self._script(keys=self._key_list, args=args))


def test_a_payload_is_handed_over_and_kept_until_taken_up(r: redis.Redis, prefix: str) -> None:
    sem = Raw(r, "api", 1, expiry=30, prefix=prefix)
    assert sem.do(LeaseMode.ACQUIRE, "holder").granted
    assert not sem.do(LeaseMode.WAIT, "task-1.a", b"message-1").granted
    reply = sem.do(LeaseMode.RELEASE, "holder")
    assert reply.handed == (("task-1.a", b"message-1"),)
    keys = LeaseKeys(prefix, "api")
    assert r.hget(keys.payloads, "task-1.a") == b"message-1", "kept until the task takes its lease up"
    taken = sem.do(LeaseMode.TAKE, "task-1.a")
    assert taken.granted and taken.held == 1
    assert r.hget(keys.payloads, "task-1.a") is None
    # A second copy of the same hand-over: unknown, dropped by the gate.
    again = sem.do(LeaseMode.TAKE, "task-1.a")
    assert not again.granted and again.unknown


def test_a_hand_over_never_taken_up_goes_back_to_the_head_of_the_queue(r: redis.Redis, prefix: str) -> None:
    """The published message was lost: after the hold, the task is handed over (published) again, first."""
    sem = Raw(r, "api", 1, expiry=30, prefix=prefix)
    sem.do(LeaseMode.ACQUIRE, "holder")
    sem.do(LeaseMode.WAIT, "first", b"m1")
    sem.do(LeaseMode.WAIT, "second", b"m2")
    assert sem.do(LeaseMode.RELEASE, "holder").handed == (("first", b"m1"),)
    time.sleep(0.4)  # past the hold: "first" never came
    reply = sem.do(LeaseMode.STATUS)
    assert reply.reclaimed == 1
    assert reply.handed == (("first", b"m1"),), "handed over again, before 'second'"
    assert sem.do(LeaseMode.TAKE, "first").granted


def test_a_late_copy_finds_its_task_queued_again_and_is_not_a_duplicate(r: redis.Redis, prefix: str) -> None:
    sem = Raw(r, "api", 1, expiry=30, prefix=prefix)
    sem.do(LeaseMode.ACQUIRE, "holder")
    sem.do(LeaseMode.WAIT, "late", b"m")
    sem.do(LeaseMode.RELEASE, "holder")
    sem.do(LeaseMode.ACQUIRE, "newcomer")  # refused: the lease is kept for "late"
    time.sleep(0.4)
    # The hold expired and nobody looked yet: the late copy's own call re-queues
    # it at the head and hands the lease over again; it takes it up.
    assert sem.do(LeaseMode.TAKE, "late").granted


def test_release_prefix_frees_every_lease_of_one_task(r: redis.Redis, prefix: str) -> None:
    sem = Raw(r, "api", 3, expiry=30, prefix=prefix)
    for lease in ("t1.a", "t1.b", "t2.a"):
        assert sem.do(LeaseMode.ACQUIRE, lease).granted
    reply = sem.do(LeaseMode.RELEASE_PREFIX, "t1.")
    assert reply.count == 2 and reply.held == 1
    assert [h.lease_id for h in sem.holders()] == ["t2.a"]


def test_a_waiting_payload_outlives_the_holders_expiry(r: redis.Redis, prefix: str) -> None:
    """The keys' TTL follows the parked tasks' stay, not only the leases': a payload never expires with a lease."""
    sem = Raw(r, "api", 1, expiry=0.2, prefix=prefix)
    sem.do(LeaseMode.ACQUIRE, "holder")
    sem.do(LeaseMode.WAIT, "parked", b"m", stay=60)
    keys = LeaseKeys(prefix, "api")
    assert r.pttl(keys.payloads) > 50_000
    time.sleep(0.3)
    reply = sem.do(LeaseMode.STATUS)
    assert reply.handed == (("parked", b"m"),)


def test_a_parked_task_whose_stay_ends_is_handed_back_overdue_not_dropped(r: redis.Redis, prefix: str) -> None:
    """Its throttle_max_defer spent in the queue: out of the queue, handed back without a lease, kept until taken."""
    sem = Raw(r, "api", 1, expiry=30, prefix=prefix)
    keys = LeaseKeys(prefix, "api")
    sem.do(LeaseMode.ACQUIRE, "holder")
    sem.do(LeaseMode.WAIT, "patient", b"m-patient", stay=60)
    sem.do(LeaseMode.WAIT, "late", b"m-late", stay=0.2)
    time.sleep(0.3)
    reply = sem.do(LeaseMode.STATUS)
    assert reply.handed == (("late", b"m-late"),), "published to fail, not dropped"
    assert reply.held == 1 and reply.queued == 1, "no lease given; 'patient' still queued"
    assert r.hget(keys.payloads, "late") == b"m-late", "kept until its copy arrives"
    # Not taken within the hold (the message was lost): handed back again.
    time.sleep(0.4)
    assert sem.do(LeaseMode.STATUS).handed == (("late", b"m-late"),)
    taken = sem.do(LeaseMode.TAKE, "late")
    assert not taken.granted and taken.overdue and not taken.unknown
    assert r.hget(keys.payloads, "late") is None
    again = sem.do(LeaseMode.TAKE, "late")
    assert again.unknown and not again.overdue, "a second copy is a duplicate"
    # The next lease still goes to the patient one.
    assert sem.do(LeaseMode.RELEASE, "holder").handed == (("patient", b"m-patient"),)


def test_an_operators_look_changes_nothing(r: redis.Redis, prefix: str) -> None:
    """A look (``throttle list``, a scrape) reclaims no lease and drops or publishes no parked task;
    the keys of a task whose stay ended outlive it for a worker's call to hand it back."""
    sem = Raw(r, "api", 1, expiry=0.2, prefix=prefix)
    keys = LeaseKeys(prefix, "api")
    sem.do(LeaseMode.ACQUIRE, "holder")
    sem.do(LeaseMode.WAIT, "late", b"m-late", stay=0.2)
    time.sleep(0.3)  # the holder's lease and the task's stay have both ended
    look = sem.do(LeaseMode.STATUS, hand_over=False)
    assert look.handed == () and look.held == 0, "the expired lease is not counted..."
    assert look.reclaimed == 0 and r.zcard(keys.holders) == 1, "...nor reclaimed: a worker's call counts it"
    assert r.hget(keys.payloads, "late") == b"m-late"
    assert r.pttl(keys.payloads) > 60_000, "kept past its stay for the workers' next call"
    worker = sem.do(LeaseMode.STATUS)
    assert worker.reclaimed == 1 and worker.handed == (("late", b"m-late"),)


def test_a_task_handed_its_lease_before_its_stay_ended_keeps_it(r: redis.Redis, prefix: str) -> None:
    sem = Raw(r, "api", 1, expiry=30, prefix=prefix)
    sem.do(LeaseMode.ACQUIRE, "holder")
    sem.do(LeaseMode.WAIT, "just-in-time", b"m", stay=0.2)
    assert sem.do(LeaseMode.RELEASE, "holder").handed == (("just-in-time", b"m"),)
    time.sleep(0.25)  # its stay ends while the message is on its way (the hold is 0.3 s)
    assert sem.do(LeaseMode.STATUS).handed == ()
    assert sem.do(LeaseMode.TAKE, "just-in-time").granted


def test_a_waiter_without_a_payload_that_stops_waiting_is_dropped(r: redis.Redis, prefix: str) -> None:
    """A blocking acquire() that died: nothing to publish, nothing kept."""
    sem = Raw(r, "api", 1, expiry=30, prefix=prefix)
    sem.do(LeaseMode.ACQUIRE, "holder")
    sem.do(LeaseMode.WAIT, "process", stay=0.2)
    time.sleep(0.3)
    reply = sem.do(LeaseMode.STATUS)
    assert reply.handed == () and reply.queued == 0
    assert sem.do(LeaseMode.RELEASE, "holder").handed == ()


@pytest.mark.parametrize("which", ["holders", "about", "queue", "waiters", "payloads"])
def test_any_key_of_another_type_is_replaced_not_failed_on(r: redis.Redis, prefix: str, which: str) -> None:
    """Found by the WRONGTYPE it causes (no TYPE check per call): the keys start afresh."""
    keys = LeaseKeys(prefix, "api")
    sem = Raw(r, "api", 1, expiry=30, prefix=prefix)
    assert sem.do(LeaseMode.ACQUIRE, "holder").granted
    r.delete(getattr(keys, which))
    r.set(getattr(keys, which), "garbage")
    reply = sem.do(LeaseMode.WAIT, "parked", b"m")
    assert reply.granted or reply.queued == 1
    assert sem.do(LeaseMode.RELEASE, "holder") is not None
    assert r.type(getattr(keys, which)) in (b"none", b"zset", b"hash")


def test_in_flight_counts_open_spans() -> None:
    """The checker the concurrency tests judge by: an end and a start at one instant do not overlap."""
    from throttle.testing.windows import in_flight

    found = in_flight([(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 4.0)])
    assert found.peak == 2
    assert found.mean == 1.75  # 7 span-seconds over 4 s
    assert found.curve[-1] == (4.0, 0)
    assert in_flight([]).peak == 0


def test_a_payload_that_cannot_be_published_does_not_hold_a_lease(redis_url: str, r: redis.Redis, prefix: str) -> None:
    """A parked entry the worker cannot decode (not ours, a newer format) gives its lease to the next task."""
    from celery import Celery

    from throttle.celery.leases import TaskSemaphore
    from throttle.celery.runtime import Runtime
    from throttle.celery.settings import settings_for

    app = Celery("lease-payloads", set_as_current=False)
    app.conf.throttle_redis_url = redis_url
    app.conf.throttle_prefix = prefix
    runtime = Runtime(settings_for(app))
    sem = TaskSemaphore(app, runtime, "api", 1, 30)
    assert sem.call(LeaseMode.ACQUIRE, "holder").granted
    assert not sem.call(LeaseMode.WAIT, "garbled", payload=b"not a parked message", stay=60).granted
    assert not sem.call(LeaseMode.WAIT, "blocking", stay=60).granted  # a plain waiter (no payload) behind it
    reply = sem.call(LeaseMode.RELEASE, "holder")
    assert reply.handed == (("garbled", b"not a parked message"),)
    assert [h.lease_id for h in sem.holders()] == ["blocking"], "the lease went on to the next waiter"
    runtime.redis.close()
    app.close()
