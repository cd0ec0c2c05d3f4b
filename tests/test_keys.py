"""The key space: no limit or tenant name can land on throttle's own keys.

Before ``throttle.keys`` owned the key space, a limit named ``live`` had its
pause marker at ``throttle:{live}:paused``, the very key of the fleet's
live-pause hash: one 429 on that limit wiped every operator pause and broke
``LiveLimits.read()`` with WRONGTYPE.  Now throttle's own keys live under
``<prefix>:~`` and bucket names may not start with ``~``.
"""

from __future__ import annotations

import pytest
import redis

from throttle import TokenBucket
from throttle.celery.settings import parse_limits
from throttle.keys import (
    RESERVED,
    BucketKeys,
    LiveKeys,
    bucket_key,
    bucket_name,
    has_hash_tag,
    limit_of,
    metrics_key,
    own_key,
    stats_key,
)
from throttle.live import LiveLimits
from throttle.metrics import MetricsRecorder, read_metrics

#: Names a user might give a limit or a tenant, chosen to collide with the old layout.
HOSTILE = ["live", "metrics", "{live}", "{live}:paused", "metrics:{api}", "demo:stats", "x}", "{}", "a:b", "ok~"]


@pytest.mark.parametrize("prefix", ["throttle", "app", ""])
def test_no_bucket_key_is_one_of_throttles_own(prefix: str) -> None:
    own = {
        *vars(LiveKeys(prefix)).values(),
        metrics_key(prefix, "api"),
        metrics_key(prefix, "live"),
        stats_key(prefix),
    }
    for name in HOSTILE + [bucket_name(n, 3, t) for n in ("live", "api") for t in HOSTILE]:
        keys = BucketKeys(prefix, name)
        assert isinstance(keys.bucket, str)
        assert keys.bucket not in own and not keys.bucket.startswith(own_key(prefix, "")), name
        # Its markers and tickets are throttle's own keys, but never another bucket's or the fleet's.
        for candidate in (keys.paused, keys.reset, keys.ticket("t1")):
            assert candidate not in own, (name, candidate)
            assert candidate != BucketKeys(prefix, f"{name}x").paused


def test_own_keys_share_a_slot_with_what_they_describe() -> None:
    # The live hashes share one tag (one script reads them); a limit's metrics
    # carry the limit's own tag, like its bucket.
    assert {k.split("{")[1].split("}")[0] for k in vars(LiveKeys("throttle")).values()} == {"live"}
    assert "{api}" in metrics_key("throttle", "api") and "{api}" in str(bucket_key("throttle", "api"))
    assert all(has_hash_tag(k) for k in vars(LiveKeys("throttle")).values())


def test_bucket_names_parse_back() -> None:
    assert bucket_name("api") == "api" and limit_of("api") == "api"
    assert bucket_name("api", 3) == "api@3" and limit_of("api@3") == "api"
    assert bucket_name("api", 3, "acme:eu") == "api@3:acme:eu" and limit_of("api@3:acme:eu") == "api"
    assert bucket_name("api", 0, "t") == "api:t" and limit_of("api:t") == "api"


@pytest.mark.parametrize("name", [RESERVED, f"{RESERVED}live", f"{RESERVED}{{live}}:paused".encode()])
def test_names_in_the_reserved_space_are_refused(r: redis.Redis, name: str | bytes) -> None:
    with pytest.raises(ValueError, match="must not start with '~'"):
        TokenBucket(r, name, rate="1/s")


def test_a_limit_named_live_or_metrics_is_accepted_in_the_config() -> None:
    limits = parse_limits({"live": "1/s", "metrics": {"rate": "2/s", "burst": 2}})
    assert set(limits) == {"live", "metrics"}


def test_a_429_on_a_limit_named_live_keeps_operator_pauses(r: redis.Redis, prefix: str) -> None:
    live = LiveLimits(r, prefix)
    live.pause("other", 30.0)
    # What the gate does when a body of a task on limit "live" raises RateLimited.
    TokenBucket(r, "live", rate="1/s", prefix=prefix).pause(5.0)
    state = live.read()  # WRONGTYPE here before the key space had one owner
    assert state.pause_left("other") > 25
    assert live.resume("other")


def test_a_limit_named_metrics_keeps_its_counters_apart(r: redis.Redis, prefix: str) -> None:
    recorder = MetricsRecorder(r, prefix)
    recorder.count(["metrics", "api"], "admitted:now", 2)
    recorder.flush()
    TokenBucket(r, "metrics", rate="1/s", prefix=prefix).consume()
    TokenBucket(r, "metrics:{api}", rate="1/s", prefix=prefix).pause(1.0)
    counters = read_metrics(r, prefix, ["metrics", "api"])
    assert counters["metrics"]["admitted:now"] == 2 and counters["api"]["admitted:now"] == 2
