"""Settings and task options: bad values fail early and say what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, ClassVar

import pytest
from celery import Celery

from tests.fleet import ROOT
from throttle.celery import ThrottledTask
from throttle.celery.settings import ThrottleSettings
from throttle.testing.redis_server import free_port


def make_app(**conf: Any) -> Celery:
    app = Celery("t", broker="memory://", set_as_current=False)
    app.conf.throttle_redis_url = conf.pop("throttle_redis_url", f"redis://127.0.0.1:{free_port()}/0")
    app.conf.update(conf)
    return app


def finalize_with(app: Celery, **options: Any) -> Any:
    @app.task(base=ThrottledTask, shared=False, **options)
    def job(n: int = 0, tenant: str = "a") -> int:
        return n

    app.finalize()
    return app.tasks[job.name]


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"api": {"rate": "10/x"}}, "throttle_limits['api']: rate '10/x' has unknown unit 'x'"),
        ({"api": {"rate": "10/s", "burst": 0}}, "throttle_limits['api']: burst must be at least 1"),
        ({"api": {"burst": 3}}, "throttle_limits['api'] needs a 'rate'"),
        ({"api": {"burst": 3, "concurrency": 2}}, "throttle_limits['api'] has a 'burst' but no 'rate'"),
        ({"api": {"rate": "1/s", "brust": 3}}, "unknown keys ['brust']"),
        (
            {"api": {"concurrency": 0}},
            "throttle_limits['api']['concurrency'] must be a whole number from 1 to 1000000, got 0",
        ),
        ({"api": {"concurrency": "5"}}, "throttle_limits['api']['concurrency'] must be a whole number"),
        ({"api": {"concurrency": True}}, "throttle_limits['api']['concurrency'] must be a whole number"),
        ({"api": {"concurrency": 5, "lease_expiry": 0.5}}, "['lease_expiry'] must be from 1 to 86400 seconds, got 0.5"),
        ({"api": {"concurrency": 5, "lease_expiry": float("nan")}}, "['lease_expiry'] must be a number of seconds"),
        ({"api": {"rate": "1/s", "lease_expiry": 30}}, "has a 'lease_expiry' but no 'concurrency'"),
        ({"api": {"concurrency": 5, "mode": "shadow"}}, "applies to rates only"),
        ({"a b": "1/s"}, "limit name 'a b'"),
        ({"api": "fast"}, "rate 'fast' is not a rate"),
        (["api"], "throttle_limits must be a dict"),
    ],
)
def test_bad_limits_name_the_setting(limits: Any, words: str) -> None:
    app = make_app(throttle_limits=limits)
    with pytest.raises(ValueError) as info:
        finalize_with(app, throttle="api")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("conf", "words"),
    [
        ({"throttle_on_backend_error": "ignore"}, "throttle_on_backend_error must be one of defer, allow, fail"),
        ({"throttle_max_defer": -1}, "throttle_max_defer must be > 0"),
        ({"throttle_max_defer": float("nan")}, "throttle_max_defer must be a number"),
        ({"throttle_max_countdown": 0}, "throttle_max_countdown must be > 0"),
        ({"throttle_prefix": 5}, "throttle_prefix must be a str"),
        ({"throttle_redis_url": "http://x"}, "throttle_redis_url must start with one of redis://"),
        ({"throttle_redis_options": "fast"}, "throttle_redis_options must be a dict"),
    ],
)
def test_bad_settings_name_the_setting(conf: dict[str, Any], words: str) -> None:
    app = make_app(throttle_limits={"api": "1/s"}, **conf)
    with pytest.raises(ValueError) as info:
        finalize_with(app, throttle="api")
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"throttle": "githb"}, ValueError, "throttle='githb' is not in throttle_limits (api)"),
        ({"throttle": "10/x"}, ValueError, "unknown unit 'x'"),
        ({"throttle": "10/s", "throttle_burst": 0}, ValueError, "burst must be at least 1"),
        ({"throttle": "api", "throttle_cost": 5}, ValueError, "throttle_cost 5 is larger than the burst 2"),
        ({"throttle": "api", "throttle_cost": 0}, ValueError, "throttle_cost must be at least 1"),
        ({"throttle": "api", "throttle_key": "tenant"}, TypeError, "throttle_key must be a callable"),
        ({"throttle": 10}, TypeError, "throttle must be a limit name"),
        ({"throttle": []}, ValueError, "must name at least one limit"),
        ({"throttle": ["api", "api"]}, ValueError, "names a limit twice"),
    ],
)
def test_bad_task_options_fail_at_finalize(options: dict[str, Any], error: type[Exception], words: str) -> None:
    app = make_app(throttle_limits={"api": {"rate": "10/s", "burst": 2}})
    with pytest.raises(error) as info:
        finalize_with(app, **options)
    assert words in str(info.value)
    assert "task '" in str(info.value)


def test_redis_url_from_broker_or_required() -> None:
    app = Celery("t", broker="redis://127.0.0.1:1/3", set_as_current=False)
    assert ThrottleSettings.from_conf(app.conf).redis_url == "redis://127.0.0.1:1/3"
    app = Celery("t", broker="amqp://guest:secret@127.0.0.1//", set_as_current=False)
    with pytest.raises(ValueError, match="throttle_redis_url is not set and the broker is not Redis"):
        ThrottleSettings.from_conf(app.conf)


def test_password_never_in_error(capsys: pytest.CaptureFixture[str]) -> None:
    app = make_app(throttle_redis_url="http://user:hunter2@host/")
    with pytest.raises(ValueError) as info:
        ThrottleSettings.from_conf(app.conf)
    assert "hunter2" not in str(info.value)


def test_countdown_stays_under_visibility_timeout() -> None:
    app = make_app(broker_transport_options={"visibility_timeout": 300})
    assert ThrottleSettings.from_conf(app.conf).max_countdown == 150


def test_django_style_namespace() -> None:
    """With namespace='CELERY', settings come from CELERY_THROTTLE_* names."""

    class DjangoSettings:
        CELERY_THROTTLE_LIMITS: ClassVar[dict[str, Any]] = {"github": {"rate": "10/s", "burst": 5}}
        CELERY_THROTTLE_REDIS_URL = "redis://127.0.0.1:6390/1"
        CELERY_THROTTLE_PREFIX = "myapp"

    app = Celery("t", set_as_current=False)
    app.config_from_object(DjangoSettings, namespace="CELERY")
    settings = ThrottleSettings.from_conf(app.conf)
    assert settings.redis_url == "redis://127.0.0.1:6390/1"
    assert settings.prefix == "myapp"
    assert settings.limits["github"].limit.burst == 5


def test_apply_async_refuses_a_dynamic_cost_over_the_burst() -> None:
    app = make_app(throttle_limits={"api": {"rate": "10/s", "burst": 2}})
    task = finalize_with(app, throttle="api", throttle_cost=lambda n=0, tenant="a": n)
    with pytest.raises(ValueError, match="throttle_cost 3 is larger than the burst 2"):
        task.apply_async((3,))
    with pytest.raises(ValueError, match="throttle_key must return a non-empty str"):
        finalize_with(
            make_app(throttle_limits={"api": "1/s"}), throttle="api", throttle_key=lambda n=0, tenant="a": None
        ).apply_async((1,))


def test_eager_and_direct_calls_bypass_the_gate() -> None:
    """No Redis listens at throttle_redis_url: only a bypassed gate can succeed."""
    app = make_app(throttle_limits={"api": {"rate": "1/h", "burst": 1}}, task_always_eager=True)
    task = finalize_with(app, throttle="api")
    assert [task.delay(i).get() for i in range(3)] == [0, 1, 2]
    assert task.apply((7,)).get() == 7
    assert task(8) == 8


def test_worker_refuses_to_start_with_a_bad_limit() -> None:
    env = dict(
        os.environ,
        BROKER_URL="memory://",
        THROTTLE_REDIS_URL="redis://127.0.0.1:1/0",
        THROTTLE_LIMITS=json.dumps({"api": {"rate": "10/x", "burst": 5}}),
        PYTHONPATH=str(ROOT),
    )
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-P", "solo", "--without-mingle"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "throttle_limits['api']: rate '10/x' has unknown unit 'x'" in result.stderr + result.stdout


def test_reference_worker_visibility_timeout() -> None:
    """BROKER_VISIBILITY_TIMEOUT also makes kombu sweep for abandoned messages
    often enough for that timeout to matter (its default sweep: every 100 s)."""
    from worker.config import celery_config

    options = celery_config({"BROKER_VISIBILITY_TIMEOUT": "10"})["broker_transport_options"]
    assert options == {"visibility_timeout": 10.0, "unacked_restore_interval": 2, "unacked_restore_throttle": 1}
    for bad in ("0", "-5", "nan", "inf", "ten"):
        with pytest.raises(ValueError, match="BROKER_VISIBILITY_TIMEOUT"):
            celery_config({"BROKER_VISIBILITY_TIMEOUT": bad})


def test_celery_report_masks_a_password_given_in_the_options(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 12, point 11: Celery masks ``throttle_redis_options['password']`` in ``celery report``
    and ``inspect conf``; a password inside ``throttle_redis_url`` (which Celery shows) is warned about."""
    from celery.app.utils import filter_hidden_settings

    from throttle.celery.settings import ThrottleSettings

    app = make_app(throttle_limits={"api": "1/s"}, throttle_redis_options={"password": "s3cret-pw"})
    report = app.conf.humanize(with_defaults=False, censored=True)
    assert "s3cret-pw" not in report and "throttle_redis_options" in report
    assert "s3cret-pw" not in str(filter_hidden_settings(app.conf.table(with_defaults=False)))
    assert ThrottleSettings.from_conf(app.conf).redis_options["password"] == "s3cret-pw"
    with caplog.at_level("WARNING", logger="throttle"):
        ThrottleSettings.from_conf({"throttle_redis_url": "redis://app:in-url-pw@127.0.0.1:6379/0"})
    assert "throttle_redis_options" in caplog.text and "in-url-pw" not in caplog.text


def test_reference_worker_keeps_results_when_given_a_backend() -> None:
    """``RESULT_BACKEND`` alone makes the reference worker store results (the producer's ``--wait`` reads them)."""
    from worker.config import celery_config

    config = celery_config({"RESULT_BACKEND": "redis://127.0.0.1:6379/1"})
    assert config["result_backend"] == "redis://127.0.0.1:6379/1" and config["task_ignore_result"] is False
    assert celery_config({})["task_ignore_result"] is True
    pickled = celery_config({"RESULT_BACKEND": "redis://h/1", "RESULT_SERIALIZER": "pickle"})
    assert pickled["result_serializer"] == "pickle" and pickled["result_accept_content"] == ["json", "pickle"]


def test_app_wide_task_cls_leaves_tasks_without_a_limit_unthrottled() -> None:
    """``Celery(task_cls=ThrottledTask)``: the app finalizes, Celery's built-in
    tasks and tasks naming no limit run unthrottled, tasks naming one are."""
    app = Celery("wide", broker="redis://127.0.0.1:1/3", task_cls=ThrottledTask, set_as_current=False)
    app.conf.throttle_limits = {"api": {"rate": "10/s"}}

    @app.task(name="wide.limited", throttle="api", shared=False)
    def limited() -> None: ...

    @app.task(name="wide.plain", shared=False)
    def plain() -> None: ...

    app.finalize()
    assert app.tasks["wide.limited"]._throttle_plan is not None
    assert app.tasks["wide.plain"]._throttle_plan is None
    assert app.tasks["celery.chord"]._throttle_plan is None and isinstance(app.tasks["celery.chord"], ThrottledTask)
    # Outside an app-wide task_cls, a forgotten throttle option is still an error.
    other = Celery("explicit", broker="redis://127.0.0.1:1/3", set_as_current=False)

    @other.task(name="explicit.forgot", base=ThrottledTask, shared=False)
    def forgot() -> None: ...

    with pytest.raises(ValueError, match="no throttle option"):
        other.finalize()


SHARED_TASK_SCRIPT = """
from celery import Celery, shared_task
from throttle.celery import ThrottledTask

@shared_task(base=ThrottledTask, throttle="10/s", name="shared.limited")
def limited(n):
    return n

plain = Celery("plain", broker="memory://", set_as_current=False)  # no throttle settings at all
plain.finalize()
try:
    plain.tasks["shared.limited"].delay(1)
except ValueError as exc:
    print("refused:", exc)
print("eager:", plain.tasks["shared.limited"].apply(args=(2,)).get())

configured = Celery("configured", broker="memory://", set_as_current=False)
configured.conf.throttle_redis_url = "redis://127.0.0.1:1/0"
configured.finalize()
print("configured:", configured.tasks["shared.limited"]._throttle_plan is not None)

broken = Celery("broken", broker="memory://", set_as_current=False)
broken.conf.throttle_limits = {"api": {"rate": "10/s"}}  # uses throttle, but no Redis for it
try:
    broken.finalize()
except ValueError as exc:
    print("broken:", exc)
"""


def test_a_shared_task_in_an_app_without_throttle_settings() -> None:
    """A shared throttled task is bound into every app of the process (a test
    app, a second app): one with no throttle settings still finalizes, and
    sending the task from it is refused with the reason; an app that does
    configure throttle, badly, still fails at finalize. (A subprocess: shared
    tasks stay registered for every later app of the process.)"""
    done = subprocess.run(
        [sys.executable, "-c", SHARED_TASK_SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "refused: task 'shared.limited' is throttled" in out and "app 'plain' has no throttle settings" in out, out
    assert "eager: 2" in out, "eager runs are never throttled"
    assert "configured: True" in out
    assert "broken: throttle_redis_url is not set" in out, out


def test_the_redis_broker_is_used_with_its_own_settings() -> None:
    """Without throttle_redis_url the buckets live in the Redis broker, reached
    as Celery reaches it: TLS options, timeouts, a Sentinel master."""
    settings = ThrottleSettings.from_conf(
        {
            "broker_url": "rediss://broker.example:6380/1",
            "broker_use_ssl": {"ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/ca.pem"},
            "broker_transport_options": {"socket_timeout": 3.0, "visibility_timeout": 7200, "master_name": "x"},
            "throttle_redis_options": {"socket_connect_timeout": 1.0},
        }
    )
    assert settings.redis_url == "rediss://broker.example:6380/1"
    options = settings.redis_options
    assert options["ssl_ca_certs"] == "/etc/ca.pem" and options["ssl_cert_reqs"] == "required"
    assert options["socket_timeout"] == 3.0 and options["socket_connect_timeout"] == 1.0
    assert "visibility_timeout" not in options and "master_name" not in options
    sentinel = ThrottleSettings.from_conf(
        {
            "broker_url": "sentinel://:pw@10.0.0.1:26379;sentinel://:pw@10.0.0.2:26380/2",
            "broker_transport_options": {"master_name": "mymaster"},
        }
    )
    assert sentinel.redis_url == "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26380/mymaster/2"
    listed = ThrottleSettings.from_conf(
        {"broker_url": ["sentinel://10.0.0.1:26379", "sentinel://10.0.0.2:26379"],
         "broker_transport_options": {"master_name": "m"}}
    )  # fmt: skip
    assert listed.redis_url == "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/m/0"
    with pytest.raises(ValueError, match="master_name"):
        ThrottleSettings.from_conf({"broker_url": "sentinel://10.0.0.1:26379"})
    with pytest.raises(ValueError, match="the broker is not Redis"):
        ThrottleSettings.from_conf({"broker_url": "amqp://guest@localhost//"})
