"""Model-based test: random programs of what tasks, operators and workers do,
checked against the promise on every window.

A program (reproducible by its seed) sends tasks whose bodies succeed,
retry with a countdown, raise ``RateLimited`` with a ``Retry-After`` from 0
to a second, fail into ``autoretry_for=(Exception,)`` or keep a pool slot
busy (late arrivals behind a busy worker); meanwhile an operator sets,
unsets and resets limits, resets one tenant's bucket, pauses and resumes.
Real workers run it.  Then, from the recorded body starts:

- every task finished, exactly once, and none failed;
- for the global limit and for every tenant's bucket, every window between
  two starts holds at most ``burst + rate * (w + EPSILON_S)`` starts per
  limit in force during it (a change lets one fresh burst through at the
  moment it takes effect: ``throttle.testing.windows.violations``).

``make test`` runs one short program; ``pytest -m long tests/celery/test_model.py``
runs longer ones, on both pools and both brokers.  A failure prints the seed:
``THROTTLE_MODEL_SEED=<seed> pytest tests/celery/test_model.py`` runs that program again.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest
import redis

from tests.celery.conftest import broker
from tests.fleet import Fleet, publishing
from throttle.celery import EPSILON_S, SPIN_S
from throttle.cli import main as throttle_cli
from throttle.live import LiveLimits
from throttle.testing.windows import Segment, violations

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

APP = "tests.paths_app"
TENANTS = ("acme", "globex", "initech")
#: The limits as configured; the program changes them live.
CONFIGURED = {
    "paths": {"rate": "10/s", "burst": 3, "per_key": False},
    "paths_tenant": {"rate": "2/s", "burst": 1},
}


#: No admission counter: a round trip between the gate and the body would
#: count in every recorded start (the paths app records admissions in the
#: body's first round trip instead).
QUIET = {"RECORD_ADMISSIONS": "0"}


@dataclass
class Program:
    """What happens, and when (seconds from the start), for one seed."""

    seed: int
    sends: list[tuple[float, str, list[Any]]] = field(default_factory=list)  # (at, task, args)
    operations: list[tuple[float, list[str]]] = field(default_factory=list)  # (at, throttle CLI arguments)


def make_program(seed: int, tasks: int, seconds: float) -> Program:
    rng = random.Random(seed)
    program = Program(seed)
    behaviours: list[tuple[int, Callable[[], list[str]]]] = [
        (40, lambda: ["ok"]),
        (10, lambda: [f"retry:{rng.choice([0, 0.1, 0.3])}", "ok"]),
        (8, lambda: ["429:0", "ok"]),
        (7, lambda: [f"429:{rng.choice([0.2, 0.5, 1.0])}", "ok"]),
        (15, lambda: [f"sleep:{rng.choice([0.2, 0.4, 0.6])}"]),
        (10, lambda: ["boom", "ok"]),
    ]
    weights = [w for w, _ in behaviours]
    for n in range(tasks):
        at = 0.0 if n == 0 else rng.uniform(0, seconds * 0.6)  # one at once: workers publish their limits
        actions = rng.choices([make for _, make in behaviours], weights)[0]()
        if actions[0] == "boom":
            program.sends.append((at, "fleet.paths_auto", [n, actions]))
        elif rng.random() < 0.4:
            program.sends.append((at, "fleet.paths_tenant", [n, actions, rng.choice(TENANTS)]))
        else:
            program.sends.append((at, "fleet.paths", [n, actions]))
    choices = [
        lambda: ["set", "paths", "--rate", f"{rng.choice([5, 10, 20])}/s", "--burst", str(rng.choice([1, 3]))],
        lambda: ["unset", "paths"],
        lambda: ["reset", "paths"],
        lambda: ["pause", "paths", "--for", f"{rng.choice([0.5, 1.0, 1.5])}s"],
        lambda: ["resume", "paths"],
        lambda: ["reset", "paths_tenant", "--key", rng.choice(TENANTS)],
        lambda: ["set", "paths_tenant", "--rate", f"{rng.choice([1, 2, 4])}/s"],
    ]
    for _ in range(max(3, int(seconds / 4))):
        program.operations.append((rng.uniform(1, seconds * 0.6), rng.choice(choices)()))
    program.sends.sort(key=lambda s: s[0])
    program.operations.sort(key=lambda o: o[0])
    return program


@dataclass
class Limits:
    """The limits in force over time, as the checker needs them (Redis time)."""

    paths: list[Segment]
    tenants: dict[str, list[Segment]]
    log: list[tuple[float, list[str]]] = field(default_factory=list)  # (Redis time, operation)


def run_program(fleet: Fleet, program: Program, redis_url: str) -> Limits:
    """Send the tasks from one thread and operate from another, on the program's clock."""
    prefix = f"throttle-{fleet.queue}"
    client = redis.Redis.from_url(redis_url)
    live = LiveLimits(client, prefix)
    rate, burst = 10.0, 3
    limits = Limits([Segment(0.0, rate, burst)], {t: [Segment(0.0, 2.0, 1)] for t in TENANTS})
    started = time.monotonic()
    errors: list[BaseException] = []

    def send() -> None:
        try:
            app = fleet.producer()
            with publishing(app) as producer:
                for at, name, args in program.sends:
                    time.sleep(max(0.0, at - (time.monotonic() - started)))
                    app.send_task(name, args=args, queue=fleet.queue, producer=producer)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        for at, args in program.operations:
            time.sleep(max(0.0, at - (time.monotonic() - started)))
            seconds, micros = client.time()
            limits.log.append((seconds + micros / 1e6, args))
            code = throttle_cli(["--redis-url", redis_url, "--prefix", prefix, *args])
            assert code in (0, 1), f"throttle {' '.join(args)} exited {code}"  # 1: nothing to unset/resume
            if code != 0 or args[0] in ("pause", "resume"):
                continue  # a pause only admits less; the promise is unchanged
            name = args[1]
            if args[0] == "reset" and "--key" in args:
                seconds, micros = client.time()
                tenant = args[-1]
                old = limits.tenants[tenant][-1]
                # At once: tasks admitted just before it may start up to the gate's wait in place after it.
                limits.tenants[tenant].append(Segment(seconds + micros / 1e6, old.rate, old.burst, carry=SPIN_S))
                continue
            state = live.read()
            at_change = state.pending[name].at
            in_force = live.in_force(only=name, scheduled=True)[name]
            assert in_force.limit is not None
            new = (in_force.limit.rate, in_force.limit.burst)
            if name == "paths":
                limits.paths.append(Segment(at_change, *new))
            else:
                for tenant in TENANTS:
                    limits.tenants[tenant].append(Segment(at_change, *new))
    finally:
        sender.join()
        client.close()
    assert not errors, errors
    return limits


def check(fleet: Fleet, program: Program, limits: Limits, timeout: float) -> None:
    reproduce = f"seed {program.seed}: THROTTLE_MODEL_SEED={program.seed} pytest {__file__}"
    expected = len(program.sends)
    rec = redis.Redis.from_url(fleet.record_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and rec.llen(f"{fleet.record_key}:finished") < expected:
            time.sleep(0.2)
        finished = Counter(rec.lrange(f"{fleet.record_key}:finished", 0, -1))
    finally:
        rec.close()
    records = fleet.records()
    dump = os.environ.get("THROTTLE_MODEL_DUMP")
    if dump:  # for a failure's post-mortem: every start, the limits' segments, the operations
        with open(f"{dump}.{program.seed}.{fleet.pool}", "w") as out:
            json.dump({"records": records, "limits": asdict(limits), "log": limits.log}, out)
    assert fleet.counts("failed") == {}, reproduce
    assert len(finished) == expected, f"{expected - len(finished)} tasks never finished; {reproduce}"
    assert max(finished.values()) == 1, f"a task finished twice; {reproduce}"
    global_starts = [r["t"] for r in records if r["task"] in ("fleet.paths", "fleet.paths_auto")]
    found = violations(global_starts, limits.paths, EPSILON_S)
    assert not found, f"limit 'paths': {len(found)} windows over, e.g. {found[0]}; {reproduce}"
    for tenant in TENANTS:
        starts = [r["t"] for r in records if r["task"] == "fleet.paths_tenant" and r["tenant"] == tenant]
        found = violations(starts, limits.tenants[tenant], EPSILON_S)
        assert not found, f"tenant {tenant!r}: {len(found)} windows over, e.g. {found[0]}; {reproduce}"
    deferred = fleet.counts("deferred")
    print(
        f"model seed {program.seed}: {expected} tasks, {len(records)} body starts, "
        f"{len(program.operations)} operations, deferrals {dict(sorted(deferred.items()))}"
    )


def _seeds(default: list[int]) -> list[int]:
    chosen = os.environ.get("THROTTLE_MODEL_SEED")
    return [int(chosen)] if chosen else default


@pytest.mark.parametrize("seed", _seeds([20261130]))
def test_model_short(fleet_factory: Any, redis_url: str, seed: int) -> None:
    """About 250 tasks in 40 s, two prefork workers (what ``make test`` runs)."""
    fleet = fleet_factory(broker("redis"), CONFIGURED, app_module=APP, workers=2, concurrency=3, extra_env=QUIET)
    program = make_program(seed, tasks=250, seconds=40)
    limits = run_program(fleet, program, redis_url)
    check(fleet, program, limits, timeout=90)


@pytest.mark.long
@pytest.mark.parametrize(
    ("seed", "pool", "broker_name"),
    [(s, pool, b) for s in _seeds([1, 2, 3]) for pool, b in (("prefork", "redis"), ("threads", "rabbitmq"))],
)
def test_model_long(fleet_factory: Any, redis_url: str, seed: int, pool: str, broker_name: str) -> None:
    """About 1,000 tasks in 150 s per program, on both pools and both brokers."""
    fleet = fleet_factory(
        broker(broker_name), CONFIGURED, app_module=APP, workers=3, concurrency=3, pool=pool, extra_env=QUIET
    )
    program = make_program(seed, tasks=1000, seconds=150)
    limits = run_program(fleet, program, redis_url)
    check(fleet, program, limits, timeout=240)
