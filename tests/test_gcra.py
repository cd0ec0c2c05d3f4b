"""The Lua script and its Python twin (used by the transaction engine) agree.

Random sequences of decisions run through the real script; before each one
the test reads the stored values, feeds them and the script's own clock to the
Python ``decide`` and requires the same answer and the same stored state.
"""

from __future__ import annotations

import random

import pytest
import redis

from throttle.gcra import Mode, Outcome, decide
from throttle.limit import Limit
from throttle.script import gcra_source, script_args

LIMITS = [Limit("200/s", 20), Limit("7/s", 3), Limit(0.5, 1), Limit("100/m", 5), Limit(1000, 1)]


@pytest.mark.parametrize("seed", range(4))
def test_script_matches_python_twin(r: redis.Redis, prefix: str, seed: int) -> None:
    rng = random.Random(seed)
    script = r.register_script(gcra_source())
    all_keys = [f"{prefix}:k{i}" for i in range(3)]
    shapes = {key: rng.choice(LIMITS) for key in all_keys}
    for _ in range(300):
        keys = rng.sample(all_keys, rng.randint(1, len(all_keys)))
        limits = [shapes[k] for k in keys]
        cost = rng.randint(1, min(lim.burst for lim in limits))
        mode = rng.choice([m for m in Mode if m not in (Mode.BATCH, Mode.RESET)])  # tested on their own
        limit_us = rng.choice([0, 10_000, 500_000, 3_000_000])
        raws = [r.get(k) for k in keys]
        lua = Outcome.from_reply(script(keys=keys, args=script_args(limits, cost, mode, limit_us)))
        twin = decide(raws, lua.now_us, limits, cost, mode, limit_us)
        assert (lua.granted, lua.refused_index, lua.wait_us, lua.remaining, lua.reset_us, lua.recovered) == (
            twin.granted,
            twin.refused_index,
            twin.wait_us,
            twin.remaining,
            twin.reset_us,
            twin.recovered,
        ), (mode, cost, limit_us, raws)
        for key, write in zip(keys, twin.writes, strict=True):
            if write is not None:
                pipe = r.pipeline()
                pipe.get(key)
                pipe.pttl(key)
                stored, pttl = pipe.execute()
                # A short-lived key may already have expired (its TTL is
                # the time to full refill, as little as 1 ms).
                if stored is not None:
                    assert stored == str(write[0]).encode()
                    assert 0 <= pttl <= write[1]  # 0: a 1 ms key (a refunded, full bucket) expiring
