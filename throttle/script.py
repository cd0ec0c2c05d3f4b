"""The Lua scripts: their sources, their registration and the bucket script's ARGV.

Every script is a real file under ``throttle/lua/`` (read once with
importlib.resources), headed by its KEYS, ARGV and reply, so it can be read,
linted and diffed as Lua:

- ``gcra.lua``: every bucket decision (peek, consume, reserve, pause, refund, batch);
- ``redeem.lua``: a task back at its booked slot redeems its ticket;
- ``slot_status.lua``: the clock and some markers, on the keys' node;
- ``live_state.lua``: the clock and the live-limit hashes.
- ``live_change.lua``: one live change of one limit, one at a time.
- ``room_*.lua``: the waiting room (park, claim, acknowledge, re-plan, arrival).
- ``lease.lua``: a concurrency limit's leases (acquire, renew, release, status).
- ``leased.lua``: a lease and a rate decision in one call (composed with the two above).

Clients register a script with ``register_script``: redis-py sends EVALSHA
and reloads the source by itself when the server answers NOSCRIPT (after
SCRIPT FLUSH, a restart or a failover).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any, Literal

from .gcra import Mode
from .limit import Limit

__all__ = ["ScriptName", "source", "register", "gcra_source", "script_args", "REPLY_LEN"]

ScriptName = Literal[
    "gcra",
    "redeem",
    "slot_status",
    "live_state",
    "live_change",
    "room_park",
    "room_claim",
    "room_ack",
    "room_replan",
    "room_arrival",
    "lease",
    "leased",
]

#: Integers in one decision's reply from ``gcra.lua``.
REPLY_LEN = 7


@cache
def source(name: ScriptName) -> str:
    """The Lua source of ``lua/<name>.lua``.

    ``leased`` is composed: lease.lua and gcra.lua, each wrapped as a
    function of (KEYS, ARGV), then leased.lua, which calls both.
    """
    if name == "leased":
        return (
            f"local function lease_call(KEYS, ARGV)\n{source('lease')}\nend\n"
            f"local function gcra_call(KEYS, ARGV)\n{source('gcra')}\nend\n"
            f"{_read('leased')}"
        )
    return _read(name)


def _read(name: str) -> str:
    return resources.files("throttle").joinpath(f"lua/{name}.lua").read_text(encoding="utf-8")


def register(client: Any, name: ScriptName) -> Any:
    """``client.register_script`` of script ``name`` (sync or asyncio client)."""
    return client.register_script(source(name))


def gcra_source() -> str:
    """The bucket script's Lua source."""
    return source("gcra")


def script_args(limits: Sequence[Limit], cost: int, mode: Mode, limit_us: int = 0) -> list[int]:
    """ARGV for ``gcra.lua``: mode, cost, limit, then (interval, tau) per bucket."""
    args = [int(mode), cost, limit_us]
    for limit in limits:
        args.append(limit.interval_us)
        args.append(limit.tau_us)
    return args
