"""``throttle metrics``: every limit's counters and state, for Prometheus.

A prometheus-client collector that reads Redis at each scrape: the counters
the workers flush (``throttle.metrics``) and each limit in force with its
tokens (``throttle.status``).  Metric names are listed in the README.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from .metrics import WAIT_BUCKETS, read_metrics
from .status import describe

__all__ = ["ThrottleCollector"]


class ThrottleCollector:
    """A prometheus-client collector: reads Redis at each scrape (every limit
    known to the fleet, as ``throttle.status.describe`` sees it)."""

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        started = time.monotonic()
        described = describe(self.redis, self.prefix)
        metrics = read_metrics(self.redis, self.prefix, described)
        admitted = CounterMetricFamily(
            "throttle_admitted", "Task bodies admitted by the gate", labels=["limit", "paid"]
        )
        deferred = CounterMetricFamily(
            "throttle_deferred", "Tasks re-sent with a countdown", labels=["limit", "reason"]
        )
        pauses = CounterMetricFamily("throttle_paused", "Pauses after a body raised RateLimited", labels=["limit"])
        errors = CounterMetricFamily(
            "throttle_backend_errors", "Decisions Redis could not answer", labels=["limit", "policy"]
        )
        shadow = CounterMetricFamily(
            "throttle_shadow_refused", "Tasks a shadow-mode limit would have deferred", labels=["limit"]
        )
        wait = HistogramMetricFamily(
            "throttle_wait_seconds", "Wait of admitted tasks since they first met the gate", labels=["limit"]
        )
        rate = GaugeMetricFamily("throttle_limit_rate", "Effective rate, tokens per second", labels=["limit"])
        burst = GaugeMetricFamily("throttle_limit_burst", "Effective burst, tokens", labels=["limit"])
        pause_left = GaugeMetricFamily(
            "throttle_pause_seconds", "Seconds left of an operator's pause", labels=["limit"]
        )
        shadow_mode = GaugeMetricFamily(
            "throttle_limit_shadow", "1 if the limit only counts (shadow mode)", labels=["limit"]
        )
        tokens = GaugeMetricFamily(
            "throttle_tokens", "Tokens in the bucket (limits not split per key)", labels=["limit"]
        )
        parked = GaugeMetricFamily("throttle_parked", "Tasks waiting in the waiting room (Redis)", labels=["limit"])
        oldest = GaugeMetricFamily(
            "throttle_parked_oldest_seconds", "How long the task parked longest ago has waited", labels=["limit"]
        )
        parked_total = CounterMetricFamily(
            "throttle_parked_tasks", "Deferrals that parked the task in the waiting room", labels=["limit"]
        )
        duplicates = CounterMetricFamily(
            "throttle_release_duplicates", "Second copies of released tasks the gate dropped", labels=["limit"]
        )
        capacity = GaugeMetricFamily(
            "throttle_concurrency", "Leases a concurrency limit allows at once", labels=["limit"]
        )
        in_flight = GaugeMetricFamily(
            "throttle_in_flight", "Leases held now: bodies of a concurrency limit running", labels=["limit"]
        )
        lease_waiting = GaugeMetricFamily(
            "throttle_lease_waiting", "Tasks parked for a lease of a concurrency limit", labels=["limit"]
        )
        expiries = CounterMetricFamily(
            "throttle_lease_expiries",
            "Leases that expired unreleased (a killed or frozen worker)",
            labels=["limit"],
        )
        handovers = CounterMetricFamily(
            "throttle_lease_handovers", "Freed leases handed to a parked task (its message published)", labels=["limit"]
        )
        for name, status in described.items():
            fields = metrics.get(name, {})
            if status.concurrency is not None:
                capacity.add_metric([name], status.concurrency)
                if status.in_flight is not None:
                    in_flight.add_metric([name], status.in_flight)
                if status.waiting is not None:
                    lease_waiting.add_metric([name], status.waiting)
                expiries.add_metric([name], fields.get("lease_expiries", 0.0))
                handovers.add_metric([name], fields.get("handed_over", 0.0))
            parked.add_metric([name], status.parked)
            if status.oldest_parked_for is not None:
                oldest.add_metric([name], status.oldest_parked_for)
            parked_total.add_metric([name], fields.get("parked", 0.0))
            duplicates.add_metric([name], fields.get("duplicates", 0.0))
            for key, value in fields.items():
                head, _, label = key.partition(":")
                if head == "admitted":
                    admitted.add_metric([name, label], value)
                elif head == "deferred":
                    deferred.add_metric([name, label], value)
                elif head == "backend_errors":
                    errors.add_metric([name, label], value)
            pauses.add_metric([name], fields.get("paused", 0.0))
            shadow.add_metric([name], fields.get("shadow_refused", 0.0))
            cumulative, buckets = 0.0, []
            for bound in WAIT_BUCKETS:
                cumulative += fields.get(f"wait:{bound:g}", 0.0)
                buckets.append((f"{bound:g}", cumulative))
            buckets.append(("+Inf", cumulative + fields.get("wait:+Inf", 0.0)))
            wait.add_metric([name], buckets, fields.get("wait_sum", 0.0))
            if status.rate is not None and status.burst is not None:
                rate.add_metric([name], status.rate)
                burst.add_metric([name], status.burst)
            pause_left.add_metric([name], round(status.in_force.pause_left, 3))
            shadow_mode.add_metric([name], 1.0 if status.in_force.mode == "shadow" else 0.0)
            if status.tokens is not None:
                tokens.add_metric([name], status.tokens)
        scrape = GaugeMetricFamily("throttle_scrape_seconds", "Time to read throttle's state from Redis")
        scrape.add_metric([], time.monotonic() - started)
        yield from (admitted, deferred, pauses, errors, shadow, wait, rate, burst, pause_left, shadow_mode, tokens)
        yield from (parked, oldest, parked_total, duplicates)
        yield from (capacity, in_flight, lease_waiting, expiries, handovers)
        yield scrape
