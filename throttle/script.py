"""The Lua script's source and its calling convention, shared by sync and async.

The script lives in ``throttle/lua/gcra.lua`` as a real file (read once with
importlib.resources) so it can be read, linted and diffed as Lua.  Clients
register it with ``register_script``: redis-py sends EVALSHA and reloads the
script by itself when the server answers NOSCRIPT (after SCRIPT FLUSH, a
restart or a failover).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

from .gcra import Mode
from .limit import Limit

__all__ = ["gcra_source", "script_args"]


@cache
def gcra_source() -> str:
    """The bucket script's Lua source."""
    return resources.files("throttle").joinpath("lua/gcra.lua").read_text(encoding="utf-8")


def script_args(limits: Sequence[Limit], cost: int, mode: Mode, limit_us: int = 0) -> list[int]:
    """ARGV for ``gcra.lua``: mode, cost, limit, then (interval, tau) per bucket."""
    args = [int(mode), cost, limit_us]
    for limit in limits:
        args.append(limit.interval_us)
        args.append(limit.tau_us)
    return args
