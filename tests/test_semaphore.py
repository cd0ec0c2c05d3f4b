"""The fleet-wide semaphore (``throttle.Semaphore``): the bound, expiry, renewal, bad input.

Real redis-server, real processes: the bound is a property of the Lua script
running atomically on the server, which only a real server can show.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
import redis.asyncio

from throttle import AsyncSemaphore, BackendUnavailable, LeaseUnavailable, Semaphore
from throttle.keys import LeaseKeys
from throttle.semaphore import _WAITER_STAY_S, HANDOVER_HOLD_S, POLL_MAX_S, LeaseMode
from throttle.testing.redis_server import RedisServer


def _hold_many(url: str, prefix: str, capacity: int, rounds: int, seed: int) -> int:
    """One process of the contention test: acquire, count itself in, hold a while, count out, release."""
    import random

    rng = random.Random(seed)
    client = redis.Redis.from_url(url)
    sem = Semaphore(client, "shared", capacity, expiry=10, prefix=prefix)
    done = 0
    for _ in range(rounds):
        with sem.acquire(timeout=60):
            inside = client.incr(f"{prefix}:inside")
            client.eval(_MAX_LUA, 1, f"{prefix}:max", inside)
            time.sleep(rng.uniform(0.002, 0.02))
            client.decr(f"{prefix}:inside")
            done += 1
    client.close()
    return done


#: Keep the largest value ever seen (atomically, on the server).
_MAX_LUA = (
    "local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
    "if tonumber(ARGV[1]) > v then redis.call('SET', KEYS[1], ARGV[1]) end return 1"
)


@contextmanager
def child_process(code: str, ready: bytes) -> Iterator[subprocess.Popen[bytes]]:
    """A Python process running ``code``, once it printed ``ready``; killed and reaped at the end."""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == ready
        yield child
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


def test_never_more_holders_than_capacity_across_processes(redis_url: str, prefix: str) -> None:
    """6 processes x 40 rounds against capacity 3: the count of bodies inside never exceeds 3.

    The count goes up after a lease is granted and down before it is
    released, so it can only under-state the leases held, never over-state.
    """
    r = redis.Redis.from_url(redis_url)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(6) as pool:
        results = pool.starmap(_hold_many, [(redis_url, prefix, 3, 40, seed) for seed in range(6)])
    assert sum(results) == 240, "every round got its lease"
    peak = int(r.get(f"{prefix}:max") or 0)
    assert 1 <= peak <= 3, f"{peak} bodies inside at once with capacity 3"
    assert peak == 3, "with 6 contending processes the capacity is used"
    keys = LeaseKeys(prefix, "shared")
    assert not r.exists(keys.holders, keys.about), "every lease released: no key left"
    r.close()


def test_same_id_is_one_lease_and_release_is_idempotent(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 2, expiry=5, prefix=prefix)
    a = sem.try_acquire("task-1")
    again = sem.try_acquire("task-1")
    assert a is not None and again is not None, "an id already held is renewed, not refused"
    assert sem.held() == 1
    b = sem.try_acquire()
    assert b is not None and sem.try_acquire() is None, "capacity 2: the third is refused"
    assert a.release() is True and a.release() is False, "released once; the second release finds nothing"
    assert sem.try_acquire() is not None, "the freed lease is taken at once"


def test_an_expired_lease_is_freed_and_its_renewal_fails(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 1, expiry=0.2, prefix=prefix)
    lease = sem.try_acquire()
    assert lease is not None and sem.try_acquire() is None
    time.sleep(0.3)
    other = sem.try_acquire()
    assert other is not None, "the expired lease was reclaimed by the next call"
    assert lease.renew() is False and lease.lost, "its holder learns it is gone"
    assert sem.held() == 1


def test_a_killed_holder_frees_its_lease_within_the_expiry(redis_url: str, prefix: str) -> None:
    """A process SIGKILLed while it holds a lease (inside ``with``, renewing): free within ``expiry``."""
    code = (
        "import sys, time, redis\n"
        "from throttle import Semaphore\n"
        f"sem = Semaphore(redis.Redis.from_url({redis_url!r}), 'api', 1, expiry=1.0, prefix={prefix!r})\n"
        "with sem.acquire(timeout=10):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    with child_process(code, b"held") as child:
        r = redis.Redis.from_url(redis_url)
        sem = Semaphore(r, "api", 1, expiry=1.0, prefix=prefix)
        time.sleep(1.5)
        assert sem.try_acquire() is None, "renewed while the holder lives (1.5 s > its 1 s expiry)"
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        lease = sem.acquire(timeout=5)
        freed_after = time.monotonic() - killed
        assert freed_after <= 1.0 + 0.3, f"freed {freed_after:.2f}s after the kill (expiry 1 s, + 0.3 s tolerance)"
        lease.release()
        r.close()


def test_a_block_longer_than_the_expiry_keeps_its_lease(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 1, expiry=0.3, prefix=prefix)
    with sem.acquire(timeout=1) as lease:
        for _ in range(10):  # 1 s: more than three expiries
            assert sem.try_acquire() is None, "renewed: never free while the block runs"
            time.sleep(0.1)
    assert not lease.lost
    assert sem.held() == 0, "released at the end of the block"


def test_the_block_is_released_when_it_raises(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 1, expiry=5, prefix=prefix)
    with pytest.raises(ZeroDivisionError), sem.acquire(timeout=1):
        1 / 0  # noqa: B018
    assert sem.held() == 0


def test_acquire_waits_for_a_release_and_times_out(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 1, expiry=30, prefix=prefix)
    lease = sem.try_acquire()
    assert lease is not None
    started = time.monotonic()
    with pytest.raises(LeaseUnavailable, match=re.escape("all 1 leases of 'api' still held after 0.2s")):
        sem.acquire(timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    threading.Timer(0.3, lease.release).start()
    started = time.monotonic()
    waited = sem.acquire(timeout=5)
    elapsed = time.monotonic() - started
    # Handed over and woken by the release itself, not found by a poll (POLL_MAX_S is 1 s).
    assert 0.3 <= elapsed < 0.3 + 0.2, f"took the lease {elapsed:.2f}s after asking"
    assert not r.exists(sem.keys.wake(waited.id)), "the wake-up was taken"
    waited.release()


def test_waiters_are_handed_the_lease_in_the_order_they_came(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 1, expiry=30, prefix=prefix)
    first = sem.try_acquire()
    assert first is not None
    order: list[int] = []

    seen: list[str] = []

    def wait(n: int) -> None:
        with sem.acquire(timeout=30):
            order.append(n)
            seen.extend(h.description for h in sem.holders())  # a handed-over lease says who took it up
            time.sleep(0.05)

    threads = []
    for n in range(4):
        threads.append(threading.Thread(target=wait, args=(n,)))
        threads[-1].start()
        time.sleep(0.1)  # each joins the queue before the next
    assert sem.try_acquire() is None, "no one jumps the queue"
    first.release()
    for thread in threads:
        thread.join(30)
    assert order == [0, 1, 2, 3]
    assert seen and all("pid" in d and "handed over" not in d for d in seen), seen
    keys = sem.keys
    assert not r.exists(keys.holders, keys.about, keys.queue, keys.waiters, keys.payloads), "nothing left"


def test_a_lease_freed_by_expiry_goes_to_the_first_waiter(r: redis.Redis, prefix: str) -> None:
    """A holder that died (its lease expires): the next call of anyone hands it to the queue's first."""
    sem = Semaphore(r, "api", 1, expiry=0.3, prefix=prefix)
    dead = sem.try_acquire()  # never renewed, never released
    assert dead is not None
    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(time.monotonic()) if sem.acquire(timeout=10) else None)
    waiter.start()
    time.sleep(0.5)  # the dead lease has expired; the waiter is blocked
    asked = time.monotonic()
    assert sem.try_acquire() is None, "the freed lease is the waiter's, not a newcomer's"
    waiter.join(10)
    assert got and got[0] - asked < 0.2, "woken by the newcomer's call, which handed the lease over"


def test_a_lost_wake_up_costs_at_most_one_poll(r: redis.Redis, prefix: str) -> None:
    """The process that handed a lease over died before waking the waiter: it looks again within POLL_MAX_S."""
    sem = Semaphore(r, "api", 1, expiry=30, prefix=prefix)
    holder = sem.try_acquire()
    assert holder is not None
    got: list[float] = []
    waiter = threading.Thread(target=lambda: got.append(time.monotonic()) if sem.acquire(timeout=10) else None)
    waiter.start()
    time.sleep(0.2)
    # Release with the script alone, as a releaser killed before its wake-up pipeline would.
    sem._script(keys=sem._key_list, args=sem._args(LeaseMode.RELEASE, holder.id))
    released = time.monotonic()
    waiter.join(10)
    assert got and got[0] - released <= POLL_MAX_S + 0.3


def test_a_killed_waiter_leaves_the_queue(redis_url: str, r: redis.Redis, prefix: str) -> None:
    """A waiter SIGKILLed in the queue: the lease goes to the next waiter within
    the waiter's stay plus the hand-over hold (it may have been handed the lease)."""
    sem = Semaphore(r, "api", 1, expiry=30, prefix=prefix)
    holder = sem.try_acquire()
    assert holder is not None
    code = (
        "import redis\n"
        "from throttle import Semaphore\n"
        f"sem = Semaphore(redis.Redis.from_url({redis_url!r}), 'api', 1, expiry=30, prefix={prefix!r})\n"
        "print('waiting', flush=True)\n"
        "sem.acquire(timeout=600)\n"
    )
    with child_process(code, b"waiting") as child:
        deadline = time.monotonic() + 10
        while not r.zcard(sem.keys.queue) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        got: list[float] = []
        waiter = threading.Thread(target=lambda: got.append(time.monotonic()) if sem.acquire(timeout=30) else None)
        waiter.start()
        time.sleep(0.1)
        holder.release()  # handed to the dead waiter (first in the queue) or, if it left already, to ours
        waiter.join(30)
        bound = _WAITER_STAY_S + HANDOVER_HOLD_S + 0.5
        assert got and got[0] - killed <= bound, f"{got[0] - killed:.2f}s after the kill (bound {bound}s)"


def test_holders_say_who_and_since_when(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 3, expiry=10, prefix=prefix)
    first = sem.try_acquire("task-a", description="worker@host-a")
    time.sleep(0.2)
    sem.try_acquire("task-b")
    holders = sem.holders()
    assert [h.lease_id for h in holders] == ["task-a", "task-b"], "longest-held first"
    assert holders[0].description == "worker@host-a" and holders[0].held_for >= 0.2
    assert "pid" in holders[1].description
    assert all(9 < h.expires_in <= 10 for h in holders)
    assert first is not None and first.release()


def test_keys_expire_with_their_last_lease(r: redis.Redis, prefix: str) -> None:
    """A holder that dies leaves keys that expire with its lease: nothing stays in Redis."""
    sem = Semaphore(r, "api", 2, expiry=0.5, prefix=prefix)
    assert sem.try_acquire() is not None
    keys = LeaseKeys(prefix, "api")
    assert 0 < r.pttl(keys.holders) <= 501 and 0 < r.pttl(keys.about) <= 501
    time.sleep(0.6)
    assert not r.exists(keys.holders, keys.about)


def test_a_key_of_another_type_is_replaced(r: redis.Redis, prefix: str) -> None:
    keys = LeaseKeys(prefix, "api")
    r.set(keys.holders, "garbage")
    r.rpush(keys.about, "x")
    sem = Semaphore(r, "api", 1, expiry=5, prefix=prefix)
    assert sem.try_acquire() is not None and sem.held() == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"capacity": 0}, ValueError, "capacity must be from 1 to 1000000, got 0"),
        ({"capacity": "5"}, TypeError, "capacity must be a whole number of leases, got str '5'"),
        ({"capacity": True}, TypeError, "capacity must be a whole number of leases, got bool True"),
        ({"capacity": 2.5}, TypeError, "capacity must be a whole number of leases, got float 2.5"),
        ({"expiry": 0}, ValueError, "expiry must be at least 0.01 seconds"),
        ({"expiry": math.nan}, ValueError, "expiry must be a finite number of seconds >= 0, got nan"),
        ({"expiry": -1}, ValueError, "expiry must be a finite number of seconds >= 0, got -1"),
        ({"expiry": 1e9}, ValueError, "expiry must be at most 86400 seconds, got 1000000000.0"),
        ({"name": "a b"}, ValueError, "name must be letters, digits, '_', '.' or '-', got 'a b'"),
        ({"name": b"api"}, TypeError, "name must be a str, got bytes b'api'"),
        ({"prefix": None}, TypeError, "prefix must be a str, got NoneType None"),
    ],
)
def test_bad_arguments_name_the_parameter(r: redis.Redis, kwargs: dict[str, Any], error: type, message: str) -> None:
    args: dict[str, Any] = {"name": "api", "capacity": 1, "expiry": 5.0, "prefix": "p"} | kwargs
    with pytest.raises(error) as info:
        Semaphore(r, **args)
    assert message in str(info.value)


def test_bad_call_arguments_name_the_parameter(r: redis.Redis, prefix: str) -> None:
    sem = Semaphore(r, "api", 1, prefix=prefix)
    with pytest.raises(ValueError, match="lease_id must be 1 to 256 characters, got ''"):
        sem.try_acquire("")
    with pytest.raises(TypeError, match="lease_id must be a str, got int 7"):
        sem.release(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds >= 0, got -1"):
        sem.acquire(timeout=-1)
    with pytest.raises(ValueError, match=re.escape("expiry must be at least 0.01 seconds")):
        sem.renew("x", expiry=0.001)
    assert sem.held() == 0, "nothing was taken by a refused call"


def test_a_stopped_redis_is_backend_unavailable_and_the_block_outcome_stands(
    restartable_redis: RedisServer, prefix: str
) -> None:
    client = redis.Redis.from_url(restartable_redis.url, socket_timeout=2)
    sem = Semaphore(client, "api", 1, expiry=1, prefix=prefix)
    with pytest.raises(KeyError), sem.acquire(timeout=1):
        restartable_redis.stop()
        raise KeyError("the body's own error")  # not hidden by the failed release
    with pytest.raises(BackendUnavailable):
        sem.try_acquire()
    restartable_redis.start()
    time.sleep(1.1)  # any lease written before the stop has expired
    assert sem.try_acquire() is not None, "works again once Redis is back"
    client.close()


def test_asyncio_semaphore(redis_url: str, prefix: str) -> None:
    """20 coroutines through capacity 2; ``async with`` renews a block longer than the expiry."""

    async def main() -> tuple[int, int, bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        sem = AsyncSemaphore(client, "api", 2, expiry=0.3, prefix=prefix)
        inside = peak = 0

        async def one(n: int) -> None:
            nonlocal inside, peak
            async with await sem.acquire(timeout=30):
                inside += 1
                peak = max(peak, inside)
                await asyncio.sleep(0.01 if n else 0.8)  # the first holds past two expiries
                inside -= 1

        await asyncio.gather(*(one(n) for n in range(20)))
        lease, second = await sem.try_acquire(), await sem.acquire(timeout=1)
        assert lease is not None
        with pytest.raises(LeaseUnavailable):
            await sem.acquire(timeout=0.05)
        held = await sem.held()
        await lease.release()
        await second.release()
        await client.aclose()
        return peak, held, lease.lost

    peak, held, lost = asyncio.run(main())
    assert peak == 2, "never more than capacity coroutines inside, and the capacity used"
    assert held == 2 and not lost
