"""Prometheus metrics at /metrics: a custom collector that reads Redis when
scraped (nothing is kept in the server), on a registry of its own (not
prometheus_client's global one, so the server's own Python metrics and any
other app's stay out, and two apps in one process do not clash).

Each scrape reads the counters kept by the Lua scripts (stats.totals: no
scan), the queues (overview.queues: SCAN of the queue keys, ZSCAN of the
parked and aside jobs, HSCAN of the leases: the running jobs, never every
job), the resources and the registry. The metrics are documented in the
README (Watching redbike, Prometheus metrics). Over shards each shard is
read and the values summed (overviews.py); the leader gauge has a ``shard``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .. import overviews, scale

if TYPE_CHECKING:
    from .app import WebContext

COUNTERS = (("done", "Runs that succeeded"), ("failed", "Runs that failed for good (status DIE)"),
            ("retried", "Runs that failed and were rescheduled for a retry"),
            ("expired", "Runs reaped after their lease expired"),
            ("due", "Jobs that became due into the queue"))


def _bound(upper: float) -> str:
    return "+Inf" if math.isinf(upper) else f"{upper:g}"


SCALE_GAUGES = (
    ("arrivals_per_minute", "arrivals_per_minute", "Jobs that became due into the queue per minute (scale's window)"),
    ("service_seconds_mean", "service_seconds_mean", "Mean run time of the queue's runs (scale's window)"),
    ("utilisation", "utilisation", "Arrivals x mean run time / the slots working the queue"),
    ("recommended_slots", "recommended_slots", "Slots redbike scale recommends for the queue (target 0.9)"),
)


class RedbikeCollector(Collector):
    def __init__(self, context: WebContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        parts = self.context.parts
        yield from self._totals()
        dispatchers, _, workers = overviews.processes(parts)
        now = self.context.clock()
        queues = overviews.queues(parts, now, workers)
        gauges = {name: GaugeMetricFamily(f"redbike_queue_{name}", text, labels=["queue"]) for name, text in (
            ("waiting", "Jobs waiting in the queue's list"), ("parked", "Jobs of the queue parked on a full resource"),
            ("ready", "Jobs of the queue woken from a resource, next to be claimed"),
            ("aside", "Jobs of the queue set aside: they need more than a capacity"),
            ("running", "Jobs of the queue running (leased)"))}
        oldest = GaugeMetricFamily("redbike_queue_oldest_waiting_seconds",
                                   "How long the queue's oldest waiting job has waited", labels=["queue"])
        paused = GaugeMetricFamily("redbike_queue_paused", "1 if the queue is paused, else 0", labels=["queue"])
        for q in queues:
            for name, gauge in gauges.items():
                gauge.add_metric([q["queue"]], q[name])
            if q["oldest_since"] is not None:
                oldest.add_metric([q["queue"]], max(0.0, now - q["oldest_since"]))
            paused.add_metric([q["queue"]], 1 if q["paused"] else 0)
        yield from gauges.values()
        yield oldest
        yield paused
        yield from self._resources()
        pools = GaugeMetricFamily("redbike_workers", "Live worker pools (registered)")
        pools.add_metric([], len(workers))
        slots = GaugeMetricFamily("redbike_slots", "Slots of the live worker pools", labels=["state"])
        total = sum(int(w.get("slots") or 0) for w in workers)
        busy = sum(1 for w in workers for s in w.get("running", []) if s.get("jobid") is not None)
        slots.add_metric(["busy"], busy)
        slots.add_metric(["idle"], max(0, total - busy))
        leader = GaugeMetricFamily("redbike_dispatcher_leader", "1 for the leading dispatcher, 0 for a standby"
                                   + (" (of its shard)" if self.context.sharded else ""),
                                   labels=["identity", "host", *(["shard"] if self.context.sharded else [])])
        for d in dispatchers:
            shard = [str(d["shard"])] if self.context.sharded else []
            leader.add_metric([str(d.get("identity")), str(d.get("host")), *shard], 1 if d["leads"] else 0)
        yield from (pools, slots, leader)
        yield from self._scale(now)

    def _scale(self, now: float) -> Iterator[Metric]:
        """`redbike scale`'s figures (its default target and window)."""
        advice = scale.advice_over(self.context.parts, now)
        gauges = {name: GaugeMetricFamily(f"redbike_queue_{metric}", text, labels=["queue"])
                  for name, metric, text in SCALE_GAUGES}
        for q in advice["queues"]:
            for name, gauge in gauges.items():
                if q[name] is not None:
                    gauge.add_metric([q["queue"]], q[name])
        yield from gauges.values()

    def _totals(self) -> Iterator[Metric]:
        totals = overviews.totals(self.context.parts)
        for name, text in COUNTERS:
            counter = CounterMetricFamily(f"redbike_jobs_{name}", text + " (since the counters started)",
                                          labels=["queue"])
            for queue, counts in sorted(totals.items()):
                counter.add_metric([queue], getattr(counts, name))
            yield counter
        durations = HistogramMetricFamily("redbike_run_duration_seconds", "How long runs took (done, failed, retried)",
                                          labels=["queue"])
        for queue, counts in sorted(totals.items()):
            buckets = [(_bound(upper), count) for upper, count in counts.buckets]
            if not buckets or buckets[-1][0] != "+Inf":
                buckets.append(("+Inf", counts.runs))
            durations.add_metric([queue], buckets, counts.seconds)
        yield durations

    def _resources(self) -> Iterator[Metric]:
        capacity = GaugeMetricFamily("redbike_resource_capacity", "A resource's capacity (unlimited: absent)",
                                     labels=["resource"])
        in_use = GaugeMetricFamily("redbike_resource_in_use", "How much of a resource running jobs hold",
                                   labels=["resource"])
        waiting = GaugeMetricFamily("redbike_resource_waiting", "Jobs waiting for a resource (in line or aside)",
                                    labels=["resource"])
        for resource, limit, used, queued in self.context.bike.capacities():
            if limit is not None:
                capacity.add_metric([resource], limit)
            in_use.add_metric([resource], used)
            waiting.add_metric([resource], queued)
        yield from (capacity, in_use, waiting)


def registry_of(context: WebContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RedbikeCollector(context))
    return registry


def routes(context: WebContext) -> list[BaseRoute]:
    registry = registry_of(context)

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics, methods=["GET"])]
