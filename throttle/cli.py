"""``throttle``: look at and change a running fleet's limits.

::

    throttle list                         # configured and live limits, tokens now
    throttle inspect api [--key acme]     # one limit (or one tenant's bucket) in detail
    throttle set api --rate 20/s --burst 5 [--mode shadow]
    throttle unset api                    # back to the configured limit
    throttle pause api --for 60s          # admit nothing of it, fleet-wide
    throttle resume api
    throttle reset api [--key acme]       # a fresh (full) bucket
    throttle release api [--key acme]     # parked tasks back to the broker now
    throttle watch                        # live table, refreshed each second
    throttle metrics --port 9464          # Prometheus endpoint

This module is longer than the others (about 420 lines) on purpose: it is the
whole command line, one short function per command around one click group,
and reads best in one place; what the commands show comes from
``throttle.status`` and what they change from ``throttle.live``.

Redis is ``--redis-url`` or, as for the reference worker, ``THROTTLE_REDIS_URL``
(then a Redis ``BROKER_URL``, then ``redis://localhost:6379/0``); the key
prefix is ``--prefix`` or ``THROTTLE_PREFIX`` (default ``throttle``).  Read
commands take ``--json``.  Bad arguments exit 2 with a one-line error; a Redis
that cannot be reached exits 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

import click
import redis

from . import __version__
from .bucket import TokenBucket
from .connect import SCHEMES, SINGLE, client_from_url, redact
from .keys import LIMIT_NAME, room_of
from .limit import MAX_WAIT_SECONDS, MODES, LimitMode
from .live import CHANGE_DELAY_S, LiveLimits, Override
from .metrics import read_metrics, summarise
from .prometheus import ThrottleCollector
from .room import WaitingRoom
from .status import LimitStatus, WatchRow, WatchSampler, bucket_of, describe

__all__ = ["main", "cli", "parse_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str) -> float:
    """``"60s"``, ``"5m"``, ``"1h"``, ``"2d"``, ``"500ms"`` or plain seconds, > 0 and at most 30 days."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"duration must be like 60s, 5m, 1h, 2d or 500ms, got {value!r}")
    seconds = float(match[1]) * _UNITS[match[2]]
    if not 0 < seconds <= MAX_WAIT_SECONDS:
        raise ValueError(f"duration must be more than 0 and at most {MAX_WAIT_SECONDS // 86400}d, got {value!r}")
    return seconds


#: The URL of this invocation, for error messages (the context is gone by then).
_current_url = [""]


def default_redis_url() -> str:
    url = os.environ.get("THROTTLE_REDIS_URL")
    if url:
        return url
    broker = os.environ.get("BROKER_URL", "")
    return broker if broker.startswith(SINGLE) else "redis://localhost:6379/0"


@dataclass
class Context:
    url: str
    prefix: str
    _client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client_from_url(self.url, socket_connect_timeout=2.0, socket_timeout=5.0)
        return self._client

    @property
    def live(self) -> LiveLimits:
        return LiveLimits(self.client, self.prefix)

    def describe(
        self, only: str | None = None, key: str | None = None, scheduled: bool = False
    ) -> dict[str, LimitStatus]:
        """Every known limit (or one), in force now (or once scheduled), with its bucket's tokens."""
        return describe(self.client, self.prefix, only, key, scheduled)


def _fail(message: str, code: int = 2) -> NoReturn:
    raise click.exceptions.Exit(_say(message, code))


def _require(done: bool, failure: str) -> None:
    """Exit 1 with ``failure`` unless ``done`` (the change had something to act on)."""
    if not done:
        _fail(failure, 1)


def _say(message: str, code: int) -> int:
    click.echo(f"throttle: error: {message}", err=True)
    return code


def _name(value: str) -> str:
    if not LIMIT_NAME.match(value):
        raise click.BadParameter(f"limit name {value!r} must be letters, digits, '_', '.' or '-'")
    return value


_URL_HELP = "where the buckets live (default: $THROTTLE_REDIS_URL)"
_PREFIX_HELP = "key prefix of the fleet (default: $THROTTLE_PREFIX or 'throttle')"


def _checked_url(url: str) -> str:
    _current_url[0] = url
    if not url.startswith(SCHEMES):
        raise click.BadParameter(f"not a Redis URL: {redact(url)!r}", param_hint="--redis-url")
    return url


@click.group(
    help="Look at and change a running fleet's limits: list, inspect, set, unset, pause, resume, reset, "
    "release, watch, metrics.  Redis: --redis-url or $THROTTLE_REDIS_URL; prefix: --prefix or "
    "$THROTTLE_PREFIX (before or after the command).",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, "--version", "-V", prog_name="throttle")
@click.option("--redis-url", default=None, help=_URL_HELP)
@click.option("--prefix", default=None, help=_PREFIX_HELP)
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, prefix: str | None) -> None:
    url = _checked_url(redis_url or default_redis_url())
    ctx.obj = Context(url, prefix if prefix is not None else os.environ.get("THROTTLE_PREFIX", "throttle"))


def _limits_table(described: dict[str, LimitStatus]) -> Any:
    from rich.table import Table

    table = Table(title="throttle limits")
    # Short headers: the table fits an 80-column terminal (the in-flight
    # column only when a concurrency limit is there to fill it).
    leases = any(status.concurrency is not None for status in described.values())
    columns = ("limit", "rate/s", "burst", "mode", "source", "tokens", "paused", "ver", "parked")
    for col in (*columns, "in flight") if leases else columns:
        table.add_column(col, justify="left" if col in ("limit", "mode", "source") else "right",
                         no_wrap=col in ("tokens", "mode", "in flight"))  # fmt: skip
    for name, status in described.items():
        f = status.in_force
        tokens = "per key" if f.per_key and status.tokens is None else _fmt(status.tokens)
        paused = f"{f.pause_left:.0f}s" if f.pause_left else ""
        parked = f"{'>=' if status.parked_partial else ''}{status.parked}" if status.parked else ""
        if status.next_release_in is not None:
            parked += f" (next in {status.next_release_in:.0f}s)"
        row = [name, _fmt(status.rate), _fmt(status.burst), f.mode, status.source, tokens, paused,
               str(f.version), parked]  # fmt: skip
        if leases:
            row.append(_in_flight(status.in_flight, status.concurrency, status.waiting))
        table.add_row(*row)
    return table


def _in_flight(held: int | None, capacity: int | None, waiting: int | None) -> str:
    """A concurrency limit's leases for a table: ``2/5 +40`` (held/allowed, + tasks waiting); empty for a rate."""
    if capacity is None:
        return ""
    return f"{_fmt(held)}/{capacity}" + (f" +{waiting}" if waiting else "")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_obj
def list_(obj: Context, as_json: bool) -> None:
    """Configured and live limits, with the tokens in each bucket now."""
    described = obj.describe()
    if as_json:
        click.echo(json.dumps({name: status.as_json() for name, status in described.items()}, indent=2))
        return
    from rich.console import Console

    if not described:
        click.echo("no limits known yet: workers publish their configured limits when they start")
        return
    Console().print(_limits_table(described))


#: What ``throttle inspect`` prints under the table, when known.
_INSPECT_FIELDS = (
    "configured", "override", "bucket", "next_token_in", "full_in", "last_release_in", "oldest_parked_for",
)  # fmt: skip


@cli.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.option("--key", default=None, help="one tenant's bucket of a per-key limit")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_obj
def inspect(obj: Context, name: str, key: str | None, as_json: bool) -> None:
    """One limit: configured and live values, its bucket's tokens, its counters."""
    if key is not None and not key:
        raise click.BadParameter("must not be empty", param_hint="--key")
    status = obj.describe(only=name, key=key)[name]
    if status.in_force.configured is None and status.in_force.override is None and status.concurrency is None:
        _fail(f"unknown limit {name!r}: not in any worker's config and not set live")
    info = status.as_json()
    info["metrics"] = summarise(read_metrics(obj.client, obj.prefix, [name])[name])
    if as_json:
        click.echo(json.dumps({name: info}, indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(_limits_table({name: status}))
    for field in _INSPECT_FIELDS:
        if info.get(field) is not None:
            console.print(f"{field}: {info[field]}")
    console.print("counters: " + ", ".join(f"{k} {v:g}" for k, v in info["metrics"].items()))
    for holder in status.holders:
        console.print(f"lease {holder.lease_id}: {holder.description}, held {holder.held_for:.1f}s, "
                      f"expires in {holder.expires_in:.1f}s unless renewed", highlight=False)  # fmt: skip


def _known(obj: Context, name: str, force: bool) -> None:
    configured = obj.live.configured()
    if name not in configured and not force:
        known = ", ".join(sorted(configured)) or "none published yet"
        _fail(f"unknown limit {name!r} (configured: {known}); add --force to set it anyway")


@cli.command("set")
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.option("--rate", default=None, help="tokens per time, e.g. 20/s, 100/m, 5000/h")
@click.option("--burst", type=click.IntRange(min=1), default=None, help="tokens the bucket holds")
@click.option("--mode", type=click.Choice(MODES), default=None, help="enforce, or shadow (count, never defer)")
@click.option("--concurrency", type=click.IntRange(1, 1_000_000), default=None, help="leases held at once")
@click.option("--force", is_flag=True, help="also for a limit no worker has published")
@click.pass_obj
def set_(
    obj: Context, name: str, rate: str | None, burst: int | None, mode: LimitMode | None, concurrency: int | None,
    force: bool,
) -> None:  # fmt: skip
    """Override a limit's rate, burst, mode or concurrency for the whole fleet, now."""
    if rate is None and burst is None and mode is None and concurrency is None:
        raise click.UsageError("give at least one of --rate, --burst, --mode, --concurrency")
    try:
        Override(rate, burst, mode, concurrency)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--rate/--burst") from exc
    if not force and name not in obj.live.configured() and name in obj.live.configured_concurrency():
        if rate is not None or burst is not None:
            _fail(f"{name!r} is a concurrency limit (no rate configured); add --force to give it a rate")
    else:
        _known(obj, name, force)
    version = obj.live.set(name, rate, burst, mode, concurrency)
    status = obj.describe(only=name, scheduled=True)[name]
    mode_now = status.in_force.mode
    rate_part = "" if status.rate is None else f"{_fmt(status.rate)}/s burst {status.burst} mode {mode_now} "
    concurrency_part = "" if status.scheduled is None or status.scheduled.concurrency is None else (
        f"concurrency {status.scheduled.concurrency} "
    )  # fmt: skip
    click.echo(f"{name}: {rate_part}{concurrency_part}(version {version}, in force fleet-wide in {CHANGE_DELAY_S:g}s)")


@cli.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.pass_obj
def unset(obj: Context, name: str) -> None:
    """Remove a live override: back to the configured limit."""
    _require(obj.live.unset(name), f"{name!r} has no live override")
    status = obj.describe(only=name, scheduled=True)[name]
    rate = "no configured rate" if status.rate is None else f"{_fmt(status.rate)}/s burst {status.burst}"
    click.echo(
        f"{name}: back to the configured limit, {rate} (version {status.in_force.version}, "
        f"in force fleet-wide in {CHANGE_DELAY_S:g}s)"
    )


@cli.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.option("--for", "duration", required=True, help="how long: 60s, 5m, 1h")
@click.option("--force", is_flag=True, help="also for a limit no worker has published")
@click.pass_obj
def pause(obj: Context, name: str, duration: str, force: bool) -> None:
    """Admit nothing of a limit, fleet-wide, for a while (tasks wait; none is lost)."""
    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--for") from exc
    _known(obj, name, force)
    obj.live.pause(name, seconds)
    click.echo(f"{name}: paused for {seconds:g}s")


@cli.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.pass_obj
def resume(obj: Context, name: str) -> None:
    """End a pause now."""
    left = obj.live.read().pause_left(name)
    _require(obj.live.resume(name), f"{name!r} is not paused")
    click.echo(f"{name}: resumed, {left:.0f}s before the pause would have ended")


@cli.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.option("--key", default=None, help="only this tenant's bucket")
@click.pass_obj
def reset(obj: Context, name: str, key: str | None) -> None:
    """A fresh, full bucket: for the whole limit (all tenants) or one --key."""
    if key is not None:
        if not key:
            raise click.BadParameter("must not be empty", param_hint="--key")
        in_force = obj.live.in_force(only=name)[name]
        tenant_bucket = bucket_of(in_force, key)
        if tenant_bucket is None or in_force.limit is None:
            _fail(f"unknown limit {name!r}")
        # Full again, and slots booked in it before now are void (their tasks
        # book again), so old and new admissions never add up.
        TokenBucket(obj.client, tenant_bucket, rate=in_force.limit, prefix=obj.prefix).reset()
        click.echo(f"{name}: bucket of {key!r} is full again")
        return
    _known(obj, name, force=False)
    # A new version: slots booked in the old bucket are void (their tasks
    # book again), so a reset never lets old and new admissions add up.
    version = obj.live.bump(name)
    click.echo(f"{name}: fresh bucket (version {version}, in force fleet-wide in {CHANGE_DELAY_S:g}s)")


@cli.command()
@click.argument("name", callback=lambda ctx, param, value: _name(value))
@click.option("--key", default=None, help="only this tenant's room")
@click.pass_obj
def release(obj: Context, name: str, key: str | None) -> None:
    """Send NAME's parked tasks back to the broker now (they meet the gate again)."""
    if key is not None and not key:
        raise click.BadParameter("must not be empty", param_hint="--key")
    room = WaitingRoom(obj.client, obj.prefix)
    rooms = [room_of(name, key)] if key is not None else room.rooms(name)
    version = obj.live.in_force(only=name)[name].version
    # All due now: the workers' releasers publish them within a tick.
    released = sum(room.replan(r, version, None) for r in rooms)
    _require(released > 0, f"{name!r} has no parked tasks" + (f" for {key!r}" if key else ""))
    click.echo(f"{name}: {released} parked tasks go back to the broker now (the gate still holds the limit)")


@cli.command()
@click.option("--interval", type=click.FloatRange(min=0.1, max=60), default=1.0, help="seconds between refreshes")
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after this many refreshes")
@click.option("--json", "as_json", is_flag=True, help="one JSON line per refresh instead of a table")
@click.pass_obj
def watch(obj: Context, interval: float, count: int | None, as_json: bool) -> None:
    """Per limit, refreshed each interval: admitted/s, deferred/s, mean wait, tokens, in flight."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    sampler = WatchSampler(obj.client, obj.prefix)

    def table(rows: dict[str, WatchRow]) -> Table:
        t = Table(title=f"throttle watch ({redact(obj.url)}, every {interval:g}s)")
        columns = ("limit", "rate/s", "admitted/s", "deferred/s", "mean wait", "tokens", "mode", "paused", "parked",
                   "in flight")  # fmt: skip
        for col in columns:
            t.add_column(col, justify="left" if col in ("limit", "mode") else "right")
        for name, r in rows.items():
            t.add_row(
                name, _fmt(r.rate), f"{r.admitted_per_s:.1f}", f"{r.deferred_per_s:.1f}",
                f"{r.mean_wait_s:.2f}s", _fmt(r.tokens), r.mode, f"{r.pause_left:.0f}s" if r.pause_left else "",
                str(r.parked), _in_flight(r.in_flight, r.concurrency, r.lease_waiting),
            )  # fmt: skip
        return t

    def sample() -> dict[str, WatchRow]:
        return sampler.sample()

    sample()  # the baseline for the first rates
    done = 0
    if as_json:
        while count is None or done < count:
            time.sleep(interval)
            click.echo(json.dumps({name: asdict(row) for name, row in sample().items()}))
            done += 1
        return
    with Live(table({}), console=Console(), auto_refresh=False) as live:
        while count is None or done < count:
            time.sleep(interval)
            live.update(table(sample()), refresh=True)
            done += 1


@cli.command()
@click.option("--port", type=click.IntRange(1, 65535), default=9464, help="HTTP port (default 9464)")
@click.option("--host", default="0.0.0.0", help="address to listen on (default all)")
@click.pass_obj
def metrics(obj: Context, port: int, host: str) -> None:
    """Serve every limit's counters, wait histogram, rate and tokens for Prometheus."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        _fail("throttle metrics needs prometheus-client: pip install 'celery-fleet-throttle[metrics]'", 1)

    obj.live.read()  # fail now, with one line, if Redis is not there
    registry = CollectorRegistry()
    registry.register(ThrottleCollector(obj.client, obj.prefix))
    server, _ = start_http_server(port, addr=host, registry=registry)
    click.echo(f"serving throttle metrics on http://{host}:{port}/metrics", err=True)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    server.shutdown()


def _url_after(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        obj = ctx.find_object(Context)
        if obj is not None:
            obj.url, obj._client = _checked_url(value), None


def _prefix_after(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        obj = ctx.find_object(Context)
        if obj is not None:
            obj.prefix = value


# The global options are accepted after the command too (`throttle list
# --redis-url X`), as people type them; given after, they win.
for _command in cli.commands.values():
    _command.params += [
        click.Option(["--redis-url"], default=None, expose_value=False, callback=_url_after, help=_URL_HELP),
        click.Option(["--prefix"], default=None, expose_value=False, callback=_prefix_after, help=_PREFIX_HELP),
    ]


def main(argv: list[str] | None = None, prog_name: str = "throttle") -> int:
    """Run the CLI; errors are one line on stderr (2: bad arguments, 1: Redis)."""
    try:
        # standalone_mode=False: click returns an Exit's code instead of exiting.
        code = cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as done:
        code = int(done.exit_code)
    except click.Abort:
        code = _say("aborted", 130)
    except Exception as exc:  # every expected error becomes one line; others propagate
        code = _say(*_describe_error(exc))
    return code if isinstance(code, int) else 0


def _describe_error(exc: Exception) -> tuple[str, int]:
    if isinstance(exc, click.UsageError):  # BadParameter, NoSuchOption, MissingParameter
        return exc.format_message().replace("\n", " "), 2
    if isinstance(exc, (redis.RedisError, OSError)):
        where = redact(_current_url[0] or default_redis_url())
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return f"Redis at {where} ({type(exc).__name__}): {first_line}", 1
    if isinstance(exc, ValueError):
        return str(exc), 2
    raise exc


if __name__ == "__main__":
    sys.exit(main())
