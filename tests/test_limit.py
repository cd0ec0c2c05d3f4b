"""Rates, limits and the argument checks every entry point shares."""

from __future__ import annotations

import math
from typing import Any

import pytest
import redis

from throttle import Limit, RedisTokenBucket, TokenBucket, parse_rate
from throttle.checks import check_cost, check_key, check_seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/s", 10.0),
        ("100/m", 100 / 60),
        ("1000/h", 1000 / 3600),
        ("5", 5.0),
        ("0.5/s", 0.5),
        (" 3 / min ", 0.05),
        ("7/second", 7.0),
        ("2/hour", 2 / 3600),
        (2.5, 2.5),
        (3, 3.0),
        (1e6, 1e6),
    ],
)
def test_parse_rate(text: Any, expected: float) -> None:
    assert parse_rate(text) == pytest.approx(expected)


def test_interval_is_exact_and_rounded_up() -> None:
    assert Limit("100/m", 1).interval_us == 600_000
    assert Limit("200/s", 20).interval_us == 5_000
    assert Limit("7/s", 3).interval_us == 142_858  # 142857.14... rounded up
    assert Limit(0.5, 1).tau_us == 2_000_000
    assert Limit("3/s", 4).tau_us == 4 * 333_334


@pytest.mark.parametrize(
    ("rate", "error", "words"),
    [
        (0, ValueError, "greater than zero"),
        (-1, ValueError, "greater than zero"),
        (math.nan, ValueError, "finite"),
        (math.inf, ValueError, "finite"),
        (1e300, ValueError, "above"),
        ("0/s", ValueError, "greater than zero"),
        ("10/d", ValueError, "unknown unit 'd'"),
        ("10/x", ValueError, "unknown unit 'x'"),
        ("abc", ValueError, "not a rate"),
        ("fast", ValueError, "not a rate"),
        ("", ValueError, "not a rate"),
        ("-5/s", ValueError, "not a rate"),
        ("nan/s", ValueError, "not a rate"),
        (None, TypeError, "rate must be"),
        (True, TypeError, "rate must be"),
        ([10], TypeError, "rate must be"),
        (b"10/s", TypeError, "rate must be"),
    ],
)
def test_bad_rate_names_the_parameter(rate: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match="rate") as info:
        Limit(rate, 1)
    assert words in str(info.value)
    with pytest.raises(error, match="rate"):
        parse_rate(rate)


@pytest.mark.parametrize(
    ("burst", "error"),
    [(0, ValueError), (-1, ValueError), (2.5, ValueError), (math.nan, ValueError), (math.inf, ValueError),
     ("5", TypeError), (None, TypeError), (True, TypeError)],
)  # fmt: skip
def test_bad_burst_names_the_parameter(burst: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="burst"):
        Limit("10/s", burst)


def test_burst_that_never_refills_is_refused() -> None:
    with pytest.raises(ValueError, match="refill"):
        Limit("1/h", 10**9)


@pytest.mark.parametrize(
    ("cost", "error", "words"),
    [(0, ValueError, "at least 1"), (-3, ValueError, "at least 1"), (6, ValueError, "larger than the burst"),
     (1.5, ValueError, "whole number"), (math.nan, ValueError, "whole number"), ("1", TypeError, "whole number"),
     (None, TypeError, "whole number"), (True, TypeError, "whole number")],
)  # fmt: skip
def test_bad_cost(cost: Any, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match="cost") as info:
        check_cost(cost, burst=5)
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("key", "error"), [("", ValueError), (b"", ValueError), (None, TypeError), (5, TypeError), (["k"], TypeError)]
)
def test_bad_key(key: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="key"):
        check_key(key)


@pytest.mark.parametrize(
    ("seconds", "error"),
    [(-1, ValueError), (math.nan, ValueError), (math.inf, ValueError), (1e300, ValueError), ("1", TypeError)],
)
def test_bad_seconds(seconds: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_wait"):
        check_seconds(seconds, "max_wait")


def test_constructors_check_their_arguments(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(client, "k", rate="10/d", burst=1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(client, "k", rate=1, burst=0)
    with pytest.raises(ValueError, match="key"):
        TokenBucket(client, "", rate=1, burst=1)
    with pytest.raises(TypeError, match="prefix"):
        TokenBucket(client, "k", rate=1, burst=1, prefix=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strategy"):
        TokenBucket(client, "k", rate=1, burst=1, strategy="magic")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="redis"):
        TokenBucket("redis://localhost", "k", rate=1, burst=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="burst"):
        RedisTokenBucket(client, key="k", burst_rate=0, replenishment_rate=1)
    with pytest.raises(ValueError, match="rate"):
        RedisTokenBucket(client, key="k", burst_rate=1, replenishment_rate=-1)
    bucket = TokenBucket(client, "k", rate=1, burst=2)
    with pytest.raises(ValueError, match="cost"):
        bucket.consume(3)
    with pytest.raises(ValueError, match="max_wait"):
        bucket.reserve(max_wait=-1)
    with pytest.raises(ValueError, match="seconds"):
        bucket.pause(math.inf)


def test_errors_survive_pickling() -> None:
    """Task errors cross from pool processes to the worker and result backends."""
    import pickle

    from throttle import BackendUnavailable, Contention, RateLimited, ReservationRefused

    cause = redis.exceptions.ConnectionError("refused")
    for error in (
        BackendUnavailable("k", cause),
        Contention("k", 3),
        ReservationRefused("k", 2.0, 1.0),
        RateLimited(2.5),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)


@pytest.mark.parametrize("rate", ["999999/s", "333333/s", "12345/s", 700_001])
def test_rates_the_clock_cannot_keep_are_refused(rate: str | int) -> None:
    """Issue 12, point 12: 999,999/s used to run at 500,000/s while ``throttle list`` showed 999,999."""
    with pytest.raises(ValueError, match="cannot be kept within 1%") as info:
        Limit(rate)
    assert str(rate) in str(info.value) and "nearest rates" in str(info.value)


@pytest.mark.parametrize("rate", ["1000000/s", "500000/s", "20000/s", "10001/s", "3000/s", "100/m", "5/h"])
def test_rates_within_one_percent_are_kept(rate: str) -> None:
    limit = Limit(rate)
    assert 0.99 * parse_rate(rate) <= 1e6 / limit.interval_us <= parse_rate(rate)


@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_errors_cross_celery_result_backends_whole(serializer: str) -> None:
    """Issue 12, point 6: a result backend stores an exception as its type and
    ``args`` and rebuilds it as ``type(*args)``; every throttle error comes
    back as itself, with its data, keywords or not."""
    from celery import Celery
    from celery.backends.base import BaseBackend

    from throttle import BackendUnavailable, RateLimited
    from throttle.errors import ThrottleDeferralExpired

    backend = BaseBackend(Celery(set_as_current=False), serializer=serializer)
    for error in (
        BackendUnavailable("live limits", redis.exceptions.ConnectionError("refused")),
        RateLimited(retry_after=2.5),
        RateLimited(0, message="Retry-After: 0"),
        ThrottleDeferralExpired("waited too long"),
    ):
        back = backend.exception_to_python(backend.prepare_exception(error, serializer))
        assert type(back) is type(error), back
        assert str(back).split(":")[0] == str(error).split(":")[0]
        assert getattr(back, "retry_after", None) == getattr(error, "retry_after", None)
