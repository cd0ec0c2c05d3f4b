"""A task's throttle options, checked once and resolved against the app's settings.

``ThrottledTask.bind`` resolves them when the app is finalized, so a worker
with a bad option fails at start, naming the task and the option, not at its
first message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from ..checks import check_cost
from ..keys import bucket_name
from ..limit import ConcurrencyLimit, Limit, NamedLimit
from .settings import ThrottleSettings, check_limit_name

__all__ = ["TaskPlan", "resolve_options"]


@dataclass(frozen=True)
class TaskPlan:
    """A task's limits (decided all-or-nothing), its tenant key and its cost.

    ``limits`` are the rate limits (may be empty: concurrency only),
    ``leases`` the concurrency limits; a name configured with both is in both.
    """

    limits: tuple[NamedLimit, ...]
    key_fn: Callable[..., object] | None
    cost: int | Callable[..., object]
    leases: tuple[ConcurrencyLimit, ...] = ()

    @property
    def min_burst(self) -> int:
        # No rate limit: a cost has nothing to be larger than.
        return min((nl.limit.burst for nl in self.limits), default=1 << 30)

    @property
    def grace(self) -> float:
        """How late a task may still start at its booked slot: two emission
        intervals of its strictest limit (10 ms to 1 s).  Any 1 s window then
        holds at most two starts more than the slots in it; a task later than
        that books again rather than bunch up with the tasks after it."""
        interval = min((nl.limit.interval_us for nl in self.limits), default=1_000_000) / 1e6
        return min(1.0, max(0.01, 2 * interval))

    def cost_for(self, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
        if callable(self.cost):
            return check_cost(self.cost(*args, **kwargs), self.min_burst, "throttle_cost")
        return self.cost

    def tenant(self, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
        if self.key_fn is None:
            return None
        value = self.key_fn(*args, **kwargs)
        if not isinstance(value, str) or not value:
            raise ValueError(f"throttle_key must return a non-empty str, got {value!r}")
        return value

    def bucket_names(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
        """The configured buckets' names (version 0); the gate uses the live ones."""
        tenant = self.tenant(args, kwargs)
        return [bucket_name(nl.name, 0, tenant if nl.per_key else None) for nl in self.limits]


def resolve_options(
    task_name: str, spec: object, burst: object, key_fn: object, cost: object, settings: ThrottleSettings
) -> TaskPlan:
    """Check a task's options; every error names the option and the task."""
    where = f"task {task_name!r}"
    items: list[object] = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError(f"{where}: throttle must name at least one limit, got {spec!r}")
    limits: list[NamedLimit] = []
    leases: list[ConcurrencyLimit] = []
    names: list[str] = []
    for item in items:
        if isinstance(item, Limit):
            limits.append(NamedLimit(f"task.{task_name}", item))
        elif isinstance(item, str) and (item in settings.limits or item in settings.concurrency):
            if item in settings.limits:
                limits.append(settings.limits[item])
            if item in settings.concurrency:
                leases.append(settings.concurrency[item])
            names.append(item)
        elif isinstance(item, str) and item[:1].isdigit():
            try:
                limit = Limit(item, 1 if burst is None else cast(int, burst))  # checked by Limit
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: throttle={item!r}: {exc}") from exc
            limits.append(NamedLimit(f"task.{task_name}", limit))
        elif isinstance(item, str):
            known = ", ".join(sorted(settings.limits)) or "none configured"
            check_limit_name(item, f"{where}: throttle")
            raise ValueError(f"{where}: throttle={item!r} is not in throttle_limits ({known}) and is not a rate")
        else:
            raise TypeError(f"{where}: throttle must be a limit name, a rate like '10/s' or a Limit, got {item!r}")
    names += [nl.name for nl in limits if nl.name not in settings.limits]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: throttle names a limit twice: {names}")
    if key_fn is not None and not callable(key_fn):
        raise TypeError(f"{where}: throttle_key must be a callable(*args, **kwargs) -> str, got {key_fn!r}")
    plan = TaskPlan(tuple(limits), cast(Callable[..., object] | None, key_fn), 1, tuple(leases))
    if callable(cost):
        return TaskPlan(plan.limits, plan.key_fn, cost, plan.leases)
    return TaskPlan(plan.limits, plan.key_fn, check_cost(cost, plan.min_burst, f"{where}: throttle_cost"), plan.leases)
