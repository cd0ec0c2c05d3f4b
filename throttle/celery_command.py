"""``celery -A proj throttle ...``: the ``throttle`` command with the app's own settings.

Registered through Celery's ``celery.commands`` entry point.  It reads
``throttle_redis_url`` (or the Redis broker) and ``throttle_prefix`` from the
app given with ``-A``, so an operator needs no URL or prefix of their own;
``--redis-url`` / ``--prefix`` after the subcommand still win.
"""

from __future__ import annotations

from typing import Any

import click

from .celery.settings import settings_for
from .cli import main

__all__ = ["throttle"]


@click.command(
    name="throttle",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
    help="Look at and change this app's fleet limits (the throttle command, with the app's settings).",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def throttle(ctx: click.Context, args: tuple[str, ...]) -> None:
    app: Any = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("celery throttle needs an app: celery -A proj throttle list")
    try:
        settings = settings_for(app)
    except ValueError as exc:
        raise click.UsageError(f"this app's throttle settings: {exc}") from exc
    code = main(["--redis-url", settings.redis_url, "--prefix", settings.prefix, *args], prog_name="celery throttle")
    ctx.exit(code)
