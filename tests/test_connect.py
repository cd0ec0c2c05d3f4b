"""throttle.connect: the URL forms for one server, a cluster and Sentinel."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from throttle.connect import client_from_url, redact


def test_single_server_urls() -> None:
    client = client_from_url("redis://user:p%40ss@127.0.0.1:6390/4", socket_timeout=1.5)
    assert isinstance(client, redis.Redis)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"], kwargs["socket_timeout"]) == (4, "user", "p@ss", 1.5)


def test_sentinel_url_reads_every_part() -> None:
    client: Any = client_from_url("redis+sentinel://u:pw@127.0.0.1:26379,[::1]:26380/my%20master/3")
    pool = client.connection_pool
    assert pool.service_name == "my master"
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["username"] == "u"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    assert sentinels[1].connection_pool.connection_kwargs["host"] == "::1"
    assert sentinels[0].connection_pool.connection_kwargs["password"] == "pw"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379", "must start with one of"),
        ("redis+cluster://", "at least one host:port"),
        ("redis+cluster://127.0.0.1", "host:port"),
        ("redis+cluster://127.0.0.1:0", "host:port"),
        ("redis+cluster://:secret@127.0.0.1:7000/2", "only database 0"),
        ("redis+sentinel://:secret@127.0.0.1:26379", "service_name"),
    ],
)
def test_bad_urls_name_the_problem_and_hide_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        client_from_url(url)
    assert "secret" not in str(info.value)


def test_redact() -> None:
    assert redact("redis+cluster://u:secret@h:1,h:2") == "redis+cluster://u:***@h:1,h:2"
    assert redact(5) == 5


def test_redact_hides_a_password_holding_at_signs() -> None:
    """Issue 12, point 11: the user info runs to the last ``@`` (was: ``redis://app:***@prod-secret@host``)."""
    assert redact("redis://app:p@ss@prod-secret@host:6379/0") == "redis://app:***@host:6379/0"
    assert redact("redis+sentinel://u:pw@h1:1,h2:2/master/0") == "redis+sentinel://u:***@h1:1,h2:2/master/0"
    assert redact("rediss://user@host/0") == "rediss://user@host/0"
    assert redact("unix:///run/redis.sock") == "unix:///run/redis.sock"
