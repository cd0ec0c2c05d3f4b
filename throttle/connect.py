"""One URL for every Redis deployment the buckets can live in.

- ``redis://[user:pw@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path``:
  one server, through ``redis.Redis.from_url``;
- ``redis+cluster://[user:pw@]host:port[,host:port...]`` (``rediss+cluster://``
  for TLS): a Redis Cluster; the nodes listed are where discovery starts;
- ``redis+sentinel://[user:pw@]host:port[,host:port...]/service[/db]``
  (``rediss+sentinel://`` for TLS to the master): the master Sentinel names
  for ``service``, found again after a failover.

redis-py does the work; this only reads the URL.  The password, if any, is
never put into an error message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import redis

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

__all__ = ["client_from_url", "close_client", "redact", "SCHEMES"]

SINGLE = ("redis://", "rediss://", "unix://")
CLUSTER = ("redis+cluster://", "rediss+cluster://")
SENTINEL = ("redis+sentinel://", "rediss+sentinel://")
SCHEMES = SINGLE + CLUSTER + SENTINEL

_URL = re.compile(r"^(?P<scheme>[a-z+]+)://(?:(?P<userinfo>[^@/]*)@)?(?P<hosts>[^/?#]*)(?P<path>/[^?#]*)?$")


def redact(url: object) -> object:
    """Hide a password in a URL before it goes into a message.

    The user info runs to the last ``@`` before the path: a password written
    unencoded may itself hold ``@`` (``redis://app:p@ss@host``).
    """
    if not isinstance(url, str) or "//" not in url:
        return url
    scheme, _, rest = url.partition("//")
    path_at = rest.find("/")
    authority = rest if path_at < 0 else rest[:path_at]
    userinfo, at, hosts = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}//{user}:***@{hosts}{rest[len(authority) :]}"


def client_from_url(url: str, **options: Any) -> redis.Redis | RedisCluster:
    """A redis-py client for ``url`` (see the module docstring); ``options``
    are redis-py keyword arguments (timeouts, ``ssl_ca_certs``, ...)."""
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise ValueError(f"redis url must start with one of {', '.join(SCHEMES)}; got {redact(url)!r}")
    if url.startswith(SINGLE):
        return redis.Redis.from_url(url, **options)
    match = _URL.match(url)
    if not match or not match["hosts"]:
        raise ValueError(f"redis url must name at least one host:port, got {redact(url)!r}")
    tls = match["scheme"].startswith("rediss")
    nodes = [_host_port(part, url) for part in match["hosts"].split(",")]
    auth = _auth(match["userinfo"])
    if url.startswith(CLUSTER):
        from redis.cluster import ClusterNode, RedisCluster

        if (match["path"] or "/").strip("/") not in ("", "0"):
            raise ValueError(f"Redis Cluster has only database 0, got {redact(url)!r}")
        kwargs: dict[str, Any] = {**auth, **options}
        startup = [ClusterNode(host, port) for host, port in nodes]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=startup, ssl=tls, **kwargs)
    from redis.sentinel import Sentinel

    path = [p for p in (match["path"] or "").split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"a sentinel url ends in /service_name[/db], got {redact(url)!r}")
    db = int(path[1]) if len(path) == 2 else 0
    # The same credentials and timeouts for the sentinels and the master.
    sentinel_kwargs = {k: v for k, v in options.items() if k.startswith("socket_")} | auth
    sentinel = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs, **options)  # type: ignore[no-untyped-call]
    master: redis.Redis = sentinel.master_for(unquote(path[0]), db=db, ssl=tls, **auth)  # type: ignore[no-untyped-call]
    return master


def close_client(client: Any) -> None:
    """Close a client from ``client_from_url``, with the Sentinel clients behind it.

    A Sentinel URL's client finds its master through clients of each
    sentinel; closing the master's client alone leaves their sockets open.
    """
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        sentinel.close()
    client.close()


def _host_port(part: str, url: str) -> tuple[str, int]:
    host, _, port = part.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"redis url must list host:port pairs, got {part!r} in {redact(url)!r}")
    return host.strip("[]"), int(port)


def _auth(userinfo: str | None) -> dict[str, str]:
    if not userinfo:
        return {}
    # As redis-py reads redis://user:pw@, redis://:pw@ and redis://user@.
    user, sep, password = userinfo.partition(":")
    auth = {"password": unquote(password)} if sep and password else {}
    if user:
        auth["username"] = unquote(user)
    return auth
