"""`redbike scale`: how many worker slots each queue needs, from the
counters the scripts keep (stats.py) and the registry of live pools.

The rule is the work-queue pattern's: a queue keeps up when the time a job
takes, divided by the jobs run in parallel, stays below the time between
arrivals, i.e. when its utilisation ``rate x service time / slots`` stays
below 1. With headroom ``target`` (default 0.9: the pattern's scale-down
heuristic, "until the processing time of one task is 90% of the task
interval"), the recommendation is ``ceil(rate x service time / target)``
slots, at least one while jobs arrive or wait.

Nothing here scans jobs: the arrival rate and the service times come from
the totals and their per-minute snapshots (so from the time a dispatcher
has kept them), the slots from the registry, the backlog from the overview's
per-queue counts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import redis

from . import overview, overviews, registry, stats
from .api import Redbike
from .explain import span
from .keys import Keys

DEFAULT_TARGET = 0.9
DEFAULT_WINDOW = 600  # seconds of history the rates and service times are taken over


def quantile(buckets: tuple[tuple[float, int], ...], q: float) -> float | None:
    """The q-quantile of a cumulative duration histogram, interpolated
    linearly within its bucket (as Prometheus' histogram_quantile does);
    None when it counts no run. One in the last, open bucket is the last
    finite bound: a lower estimate."""
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, count
    return lower


def advice(client: redis.Redis, keys: Keys, now: float, *, target: float = DEFAULT_TARGET,
           window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """Per queue: arrivals per minute, mean and p95 service time (s), slots
    of live pools that work it and how many of them run one of its jobs now,
    utilisation, waiting jobs and the oldest one's age, and the slots
    recommended; with the window the figures cover (None: no snapshot yet)."""
    counted = stats.since(client, keys, now, window)
    pools = [p for p in registry.live(client, keys) if p["role"] == "worker"]
    shown_queues = overview.queues(client, keys, [q for p in pools for q in p.get("queues", [])], now)
    return advise(now, [counted], pools, shown_queues, target)


def advice_over(parts: Sequence[Redbike], now: float, *, target: float = DEFAULT_TARGET,
                window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """:func:`advice` over every part of an installation (overviews.py):
    each shard's counters over its own window, arrivals and runs summed, the
    service times weighted by the runs, the pools and queues merged."""
    if len(parts) == 1:
        return advice(parts[0].client, parts[0].keys, now, target=target, window=window)
    counted = [stats.since(part.client, part.keys, now, window) for part in parts]
    pools = overviews.processes(parts)[2]
    return advise(now, counted, pools, overviews.queues(parts, now, pools), target)


def advise(now: float, counted: list[tuple[float | None, dict[str, stats.QueueTotals]]],
           pools: list[dict[str, Any]], queues: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """The advice from what each shard counted (stats.since: the start of
    its window, or None, and its counts per queue), the live pools and the
    queues' rows (overview.queues)."""
    shown_queues = {q["queue"]: q for q in queues}
    windows = [(start, counts) for start, counts in counted if start is not None]
    rows = []
    for name in sorted(set(shown_queues).union(*(counts for _, counts in counted))):
        per_shard = [(counts.get(name, stats.QueueTotals()), (now - start) / 60) for start, counts in windows]
        one = functools.reduce(stats.QueueTotals.plus, (totals for totals, _ in per_shard), stats.QueueTotals())
        waiting = shown_queues.get(name, {})
        slots = sum(int(p.get("slots", 0)) for p in pools if name in p.get("queues", []))
        busy = sum(1 for p in pools for run in p.get("running", []) if run.get("queue") == name)
        ended = one.runs + one.expired
        service = one.seconds / one.runs if one.runs else None  # expired runs took no service time of their own
        timed = [(totals, minutes) for totals, minutes in per_shard if minutes]
        rate = sum(totals.due / minutes for totals, minutes in timed) if timed else None  # per minute
        load = rate / 60 * service if rate is not None and service is not None else None  # slots kept busy
        backlog = int(waiting.get("waiting", 0)) + int(waiting.get("parked", 0)) + int(waiting.get("ready", 0))
        recommended = None
        if load is not None:
            recommended = max(math.ceil(load / target - 1e-9), 1 if rate or backlog else 0)
        rows.append({
            "queue": name, "arrivals_per_minute": None if rate is None else round(rate, 3),
            "service_seconds_mean": None if service is None else round(service, 4),
            "service_seconds_p95": _rounded(quantile(one.buckets, 0.95)) if one.buckets else None,
            "runs": ended, "slots": slots, "busy": busy,
            "utilisation": None if load is None or not slots else round(load / slots, 3),
            "waiting": backlog, "oldest_waiting_seconds": None if waiting.get("oldest_since") is None
            else round(now - waiting["oldest_since"], 1),
            "recommended_slots": recommended,
            "advice": _verdict(recommended, slots),
        })
    latest = max((start for start, _ in windows), default=None)  # the shortest window of all
    return {"at": now, "target": target, "window_seconds": None if latest is None else round(now - latest, 1),
            "queues": rows}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _verdict(recommended: int | None, slots: int) -> str:
    if recommended is None:
        return "unknown"
    if recommended > slots:
        return "scale up"
    if recommended < slots:
        return "scale down"
    return "ok"


HEADER = ("queue", "arrivals/min", "service mean", "p95", "slots", "busy", "utilisation", "waiting", "oldest",
          "recommended", "advice")


def _seconds(value: float | None) -> str:
    return "-" if value is None else span(value)


def lines(shown: dict[str, Any]) -> list[str]:
    """`redbike scale`'s table."""
    covered = shown["window_seconds"]
    if covered is None:
        return ["no counts yet: a leading dispatcher keeps them (a snapshot a minute); try again in a minute"]
    rows = [HEADER] + [(
        q["queue"], "-" if q["arrivals_per_minute"] is None else f"{q['arrivals_per_minute']:g}",
        _seconds(q["service_seconds_mean"]), _seconds(q["service_seconds_p95"]), str(q["slots"]), str(q["busy"]),
        "-" if q["utilisation"] is None else f"{q['utilisation']:.0%}", str(q["waiting"]),
        _seconds(q["oldest_waiting_seconds"]),
        "-" if q["recommended_slots"] is None else str(q["recommended_slots"]), q["advice"],
    ) for q in shown["queues"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    table = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return [f"over the last {span(covered)}, target utilisation {shown['target']:.0%}", *table]
