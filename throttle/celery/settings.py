"""throttle's settings, read once per Celery app from ``app.conf``.

Every setting is a lowercase Celery setting (``throttle_limits``...), so it
can live wherever the app's configuration lives; with Django's
``config_from_object("django.conf:settings", namespace="CELERY")`` they are
``CELERY_THROTTLE_LIMITS`` and so on.  A wrong value raises ``ValueError``
naming the setting, when the app is finalized (worker start, first
``apply_async``), not at the first task.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from celery import Celery

from ..checks import check_prefix
from ..connect import SCHEMES, SINGLE, redact
from ..keys import LIMIT_NAME
from ..limit import DEFAULT_LEASE_EXPIRY_S, MAX_WAIT_SECONDS, MODES, ConcurrencyLimit, Limit, LimitMode, NamedLimit
from ..semaphore import MAX_CAPACITY, MAX_EXPIRY_S

logger = logging.getLogger("throttle")

__all__ = [
    "ThrottleSettings",
    "settings_for",
    "parse_limits",
    "parse_concurrency",
    "check_limit_name",
    "BackendPolicy",
    "ON_BACKEND_ERROR",
]

#: What the gate does when Redis cannot answer: re-send the task later, run
#: it unthrottled, or fail it.
BackendPolicy = Literal["defer", "allow", "fail"]
ON_BACKEND_ERROR: tuple[BackendPolicy, ...] = ("defer", "allow", "fail")

#: Defaults: how long a task may wait in total (no deadline of its own: as
#: far as a bucket books, 30 days, so a backlog of any size completes; set
#: it for tasks that are useless when late), and the longest single
#: countdown.  A countdown must stay well under the broker's redelivery
#: horizon (Redis visibility_timeout 3600 s, RabbitMQ consumer_timeout 30 min).
DEFAULT_MAX_DEFER = float(MAX_WAIT_SECONDS)
#: A wait longer than this parks the task in the waiting room (Redis)
#: instead of a countdown message held by a worker.
DEFAULT_PARK_AFTER = 60.0
DEFAULT_MAX_COUNTDOWN = 600.0
DEFAULT_REDIS_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 2.0,
    "socket_timeout": 5.0,
    "health_check_interval": 30,
}


@dataclass(frozen=True)
class ThrottleSettings:
    redis_url: str
    prefix: str = "throttle"
    limits: Mapping[str, NamedLimit] = field(default_factory=dict)
    #: The concurrency limits of ``throttle_limits`` (``{"concurrency": 5}``), by name.
    concurrency: Mapping[str, ConcurrencyLimit] = field(default_factory=dict)
    on_backend_error: BackendPolicy = "defer"
    max_defer: float = DEFAULT_MAX_DEFER
    max_countdown: float = DEFAULT_MAX_COUNTDOWN
    redis_options: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_REDIS_OPTIONS))
    metrics: bool = True
    park_after: float | None = DEFAULT_PARK_AFTER
    #: False: every throttled task runs as a plain task (tests, a staging fleet).
    enabled: bool = True

    @classmethod
    def from_conf(cls, conf: Any) -> ThrottleSettings:
        """Read and check every ``throttle_*`` setting of a Celery ``app.conf``."""
        url, carried = _redis_url(conf)
        return cls(
            redis_url=url,
            prefix=_prefix(conf.get("throttle_prefix", "throttle")),
            limits=parse_limits(conf.get("throttle_limits") or {}),
            concurrency=parse_concurrency(conf.get("throttle_limits") or {}),
            on_backend_error=_policy(conf.get("throttle_on_backend_error", "defer")),
            max_defer=_seconds("throttle_max_defer", conf.get("throttle_max_defer", DEFAULT_MAX_DEFER)),
            max_countdown=_max_countdown(conf),
            redis_options=_redis_options(conf.get("throttle_redis_options"), carried),
            metrics=_flag("throttle_metrics", conf.get("throttle_metrics", True)),
            park_after=_park_after(conf.get("throttle_park_after", DEFAULT_PARK_AFTER)),
            enabled=_flag("throttle_enabled", conf.get("throttle_enabled", True)),
        )


def check_limit_name(name: object, setting: str) -> str:
    if not isinstance(name, str) or not LIMIT_NAME.match(name):
        raise ValueError(f"{setting}: limit name {name!r} must be letters, digits, '_', '.' or '-'")
    return name


def parse_limits(value: object) -> dict[str, NamedLimit]:
    """``{"github": {"rate": "10/s", "burst": 5}, "mail": "100/m"}`` -> NamedLimits (the rate limits)."""
    return _parse(value)[0]


def parse_concurrency(value: object) -> dict[str, ConcurrencyLimit]:
    """``{"partner": {"concurrency": 5, "lease_expiry": 30}}`` -> ConcurrencyLimits."""
    return _parse(value)[1]


_KEYS = ("rate", "burst", "per_key", "mode", "concurrency", "lease_expiry")


def _parse(value: object) -> tuple[dict[str, NamedLimit], dict[str, ConcurrencyLimit]]:
    """Every entry of ``throttle_limits``: a rate, a concurrency, or both under one name."""
    if not isinstance(value, Mapping):
        raise ValueError(f"throttle_limits must be a dict of name -> {{'rate': ..., 'burst': ...}}, got {value!r}")
    limits: dict[str, NamedLimit] = {}
    concurrency: dict[str, ConcurrencyLimit] = {}
    for name, given in value.items():
        check_limit_name(name, "throttle_limits")
        where = f"throttle_limits[{name!r}]"
        is_rate = isinstance(given, (str, int, float)) and not isinstance(given, bool)
        spec = {"rate": given} if is_rate else given
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} must be a rate or a dict with 'rate' and 'burst', got {spec!r}")
        unknown = set(spec) - set(_KEYS)
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}: use {', '.join(repr(k) for k in _KEYS)}")
        if "rate" not in spec and "concurrency" not in spec:
            raise ValueError(f"{where} needs a 'rate' such as '10/s', a 'concurrency' such as 5, or both")
        per_key = spec.get("per_key", True)
        if not isinstance(per_key, bool):
            raise ValueError(f"{where}['per_key'] must be True or False, got {per_key!r}")
        mode = spec.get("mode", "enforce")
        if mode not in MODES:
            raise ValueError(f"{where}['mode'] must be 'enforce' or 'shadow', got {mode!r}")
        if "rate" in spec:
            try:
                limit = Limit(spec["rate"], spec.get("burst", 1))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: {exc}") from exc
            limits[name] = NamedLimit(name, limit, per_key, cast(LimitMode, mode))
        elif "burst" in spec:
            raise ValueError(f"{where} has a 'burst' but no 'rate'")
        if "concurrency" in spec:
            if mode != "enforce":
                raise ValueError(f"{where}['mode'] {mode!r} applies to rates only: a concurrency limit is enforced")
            concurrency[name] = ConcurrencyLimit(
                name, _capacity(where, spec["concurrency"]), per_key, _lease_expiry(where, spec)
            )
        elif "lease_expiry" in spec:
            raise ValueError(f"{where} has a 'lease_expiry' but no 'concurrency'")
    return limits, concurrency


def _capacity(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CAPACITY:
        raise ValueError(f"{where}['concurrency'] must be a whole number from 1 to {MAX_CAPACITY}, got {value!r}")
    return value


def _lease_expiry(where: str, spec: Mapping[str, Any]) -> float:
    value = spec.get("lease_expiry", DEFAULT_LEASE_EXPIRY_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{where}['lease_expiry'] must be a number of seconds, got {value!r}")
    if not 1 <= value <= MAX_EXPIRY_S:
        raise ValueError(f"{where}['lease_expiry'] must be from 1 to {MAX_EXPIRY_S:g} seconds, got {value!r}")
    return float(value)


#: Options of Celery's Redis broker (``broker_transport_options``) that mean
#: the same for the buckets' client; ``throttle_redis_options`` still wins.
_CARRIED_TRANSPORT_OPTIONS = (
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "socket_keepalive_options",
    "health_check_interval", "retry_on_timeout", "username", "password",
)  # fmt: skip


def _redis_url(conf: Any) -> tuple[str, dict[str, Any]]:
    """The buckets' Redis: ``throttle_redis_url``, else the Redis broker with
    the broker's own connection settings (TLS, timeouts, Sentinel master)."""
    url = conf.get("throttle_redis_url")
    if url is None:
        return _from_broker(conf)
    return _checked_url(url), {}


def _from_broker(conf: Any) -> tuple[str, dict[str, Any]]:
    broker = conf.get("broker_url") or ""
    if isinstance(broker, (list, tuple)):
        broker = ";".join(str(b) for b in broker)
    if not isinstance(broker, str) or not broker.startswith((*SINGLE, "sentinel://", "sentinels://")):
        raise ValueError(
            "throttle_redis_url is not set and the broker is not Redis: set throttle_redis_url = 'redis://host:6379/0'"
        )
    transport = conf.get("broker_transport_options") or {}
    carried = {k: transport[k] for k in _CARRIED_TRANSPORT_OPTIONS if k in transport}
    ssl = conf.get("broker_use_ssl")
    if isinstance(ssl, Mapping):
        carried.update({k: v for k, v in ssl.items() if k.startswith("ssl_")})
    if broker.startswith(SINGLE):
        return broker, carried
    return _sentinel_url(broker, transport), carried


def _sentinel_url(broker: str, transport: Mapping[str, Any]) -> str:
    """kombu's ``sentinel://h1:26379;sentinel://h2:26379/0`` + ``master_name`` -> ``redis+sentinel://...``."""
    master = transport.get("master_name")
    if not isinstance(master, str) or not master:
        raise ValueError(
            "the broker is a Redis Sentinel but broker_transport_options has no 'master_name': "
            "set it, or set throttle_redis_url = 'redis+sentinel://host:26379/<master>'"
        )
    hosts, userinfo, db = [], "", "0"
    for part in broker.split(";"):
        rest = part.strip().partition("://")[2]
        if not rest:
            continue
        authority, _, path = rest.partition("/")
        who, at, host = authority.rpartition("@")
        if at and not userinfo:
            userinfo = who + "@"
        hosts.append(host)
        if path.strip("/"):
            db = path.strip("/")
    tls = "s" if broker.startswith("sentinels://") else ""
    return _checked_url(f"redis{tls}+sentinel://{userinfo}{','.join(hosts)}/{master}/{db}")


def _checked_url(url: object) -> str:
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise ValueError(f"throttle_redis_url must start with one of {', '.join(SCHEMES)}; got {redact(url)!r}")
    if redact(url) != url:
        # Celery masks settings named like *PASS*/*KEY* and the broker URL in
        # `celery report` and `celery inspect conf`, but not this one.
        logger.warning(
            "throttle_redis_url carries a password, which `celery report` and `celery inspect conf` show: "
            "put it in throttle_redis_options={'password': ...} instead (Celery masks that): %s",
            redact(url),
        )
    return url


def _flag(setting: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{setting} must be True or False, got {value!r}")
    return value


def _prefix(value: object) -> str:
    # The same check as every bucket's prefix; a setting's error is a ValueError.
    try:
        return check_prefix(value, "throttle_prefix")
    except TypeError as exc:
        raise ValueError(str(exc)) from exc


def _policy(value: object) -> BackendPolicy:
    if value not in ON_BACKEND_ERROR:
        raise ValueError(f"throttle_on_backend_error must be one of {', '.join(ON_BACKEND_ERROR)}; got {value!r}")
    return value


def _seconds(setting: str, value: object, upper: float = MAX_WAIT_SECONDS) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{setting} must be a number of seconds, got {value!r}")
    if not 0 < value <= upper:
        raise ValueError(f"{setting} must be > 0 and at most {upper:g} seconds, got {value!r}")
    return float(value)


def _park_after(value: object) -> float | None:
    """None or False: never park (every wait is a countdown message)."""
    if value is None or value is False:
        return None
    return _seconds("throttle_park_after", value)


def _max_countdown(conf: Any) -> float:
    """The longest countdown: the setting, kept under the broker's horizon."""
    value = _seconds("throttle_max_countdown", conf.get("throttle_max_countdown", DEFAULT_MAX_COUNTDOWN))
    options = conf.get("broker_transport_options") or {}
    visibility = options.get("visibility_timeout") if isinstance(options, Mapping) else None
    if isinstance(visibility, (int, float)) and visibility > 0:
        # An unacked (held) message older than visibility_timeout is
        # delivered again: stay at half of it.
        value = min(value, visibility / 2)
    return value


def _redis_options(value: object, carried: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then what the broker's settings carried over, then ``throttle_redis_options``."""
    options = {**DEFAULT_REDIS_OPTIONS, **(carried or {})}
    if value is None:
        return options
    if not isinstance(value, Mapping):
        raise ValueError(f"throttle_redis_options must be a dict of redis-py keyword arguments, got {value!r}")
    options.update(value)
    return options


_cache: weakref.WeakKeyDictionary[Celery, ThrottleSettings] = weakref.WeakKeyDictionary()


def settings_for(app: Celery) -> ThrottleSettings:
    """The app's settings, read and checked on first use, then cached."""
    settings = _cache.get(app)
    if settings is None:
        settings = ThrottleSettings.from_conf(app.conf)
        _cache[app] = settings
    return settings
