"""Eight processes on one key, demand far above the rate: the bucket grants
exactly ``burst + rate * t`` (within one token above and 3 % below).

``t`` is the span between the first and the last grant on the Redis clock
(every decision reports the server time it was made at), so a loaded client
machine cannot stretch or shrink it.
"""

from __future__ import annotations

from functools import partial

import pytest

from bench.hammer import hammer
from bench.limiters import throttle_bucket

pytestmark = pytest.mark.slow

PROCESSES = 8
DURATION = 5.0


def _check(result_tokens: int, ideal: float) -> None:
    assert result_tokens <= ideal + 1, f"over-admitted: {result_tokens} > {ideal:.2f} + 1"
    assert result_tokens >= 0.97 * ideal, f"under-admitted: {result_tokens} < 0.97 * {ideal:.2f}"


@pytest.mark.parametrize(("rate", "burst"), [(200, 20), (7, 3), (0.5, 1)])
def test_fidelity_one_key(redis_url: str, prefix: str, rate: float, burst: int) -> None:
    factory = partial(throttle_bucket, redis_url, f"{prefix}-fidelity", rate, burst)
    result = hammer(factory, processes=PROCESSES, duration=DURATION)
    assert result.errors == 0
    # Demand far above the rate: every process asked many times per token.
    assert result.decisions > 20 * result.tokens
    _check(result.tokens, result.ideal(rate, burst))


def test_fidelity_mixed_costs(redis_url: str, prefix: str) -> None:
    rate, burst = 200, 20
    factory = partial(throttle_bucket, redis_url, f"{prefix}-mixed", rate, burst)
    result = hammer(factory, processes=PROCESSES, duration=DURATION, costs=(1, 2, 3, 4, 5))
    assert result.errors == 0
    # Under contention cheap calls take most single tokens as they drip in
    # (expensive ones need several at once); some expensive ones still pass.
    assert max(cost for _, cost in result.grants) > 1
    _check(result.tokens, result.ideal(rate, burst))


@pytest.mark.parametrize("strategy", ["script", "transaction"])
def test_fidelity_under_clock_skew(redis_url: str, prefix: str, strategy: str) -> None:
    """Each process's time.time() is shifted by -2 s ... +2 s: no change."""
    rate, burst = 200, 20
    skews = [-2.0 + 4.0 * i / (PROCESSES - 1) for i in range(PROCESSES)]
    factory = partial(throttle_bucket, redis_url, f"{prefix}-skew", rate, burst, strategy)
    result = hammer(factory, processes=PROCESSES, duration=DURATION, clock_skews=skews)
    _check(result.tokens, result.ideal(rate, burst))
