"""The read model over shards (``shards = N``, shards.py): each shard's
overview (overview.py), queues, processes and counters, merged into one.

Every function takes the installation's parts (a Redbike per shard,
:func:`parts_of`); with one part it answers exactly what overview.py or
stats.py does, with the same commands, so an installation without shards
sees nothing new. Over several parts:

- counts (statuses, queues' jobs, runs per minute, counters) are summed;
  a queue's oldest waiting job is the oldest of its shards';
- resources are listed (a resource lives on one shard), failures merged
  newest first (bounded as on one shard);
- dispatchers are listed with their ``shard``: each shard has its own lease,
  so its own leader (``leaders``, one per shard);
- a worker pool that registers on several shards under one identity is one
  pool, its slots' runs merged;
- the Redis section is the first server's, with ``servers`` (one per
  distinct server, each with its shards) when the shards are on several.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import overview, stats
from .api import Redbike

if TYPE_CHECKING:
    from .sharded import ShardedRedbike

QUEUE_COUNTS = ("waiting", "parked", "ready", "aside", "running")
RATE_WINDOWS = ("per_minute_5m", "per_minute_60m")


def parts_of(bike: Redbike | ShardedRedbike) -> list[Redbike]:
    """The job spaces of an installation: the Redbike itself, or a ShardedRedbike's shards'."""
    return [bike] if isinstance(bike, Redbike) else list(bike.parts)


def read(parts: Sequence[Redbike], now: float, *, scan: bool = True, prefix: str | None = None) -> dict[str, Any]:
    """The overview of every part at ``now``, merged (``prefix``: the
    installation's, shown in place of the shards' own)."""
    if len(parts) == 1:
        return overview.read(parts[0].client, parts[0].keys, now, scan=scan)
    readings = [overview.read(part.client, part.keys, now, scan=scan) for part in parts]
    dispatchers, leader, leaders = _dispatchers([(r["dispatchers"], r["leader"]) for r in readings])
    servers = _servers(parts)
    shown: dict[str, Any] = {
        "at": now, "prefix": prefix if prefix is not None else readings[0]["prefix"], "shards": len(parts),
        "redis": readings[servers[0][0]]["redis"],
        "dispatchers": dispatchers, "leader": leader, "leaders": leaders,
        "workers": pools([r["workers"] for r in readings]),
        "queues": merge_queues([r["queues"] for r in readings]),
        "statuses": _statuses([r["statuses"] for r in readings]),
        "resources": sorted((r for reading in readings for r in reading["resources"]), key=lambda r: r["resource"]),
        "failures": _failures([r["failures"] for r in readings]),
    }
    if len(servers) > 1:
        shown["servers"] = [dict(readings[group[0]]["redis"], shards=group) for group in servers]
    return shown


def processes(parts: Sequence[Redbike]) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]:
    """overview.processes over every part: the dispatchers (each with its
    ``shard`` over several), the one leader of every shard (else None) and
    the worker pools (one per identity)."""
    if len(parts) == 1:
        return overview.processes(parts[0].client, parts[0].keys)
    found = [overview.processes(part.client, part.keys) for part in parts]
    dispatchers, leader, _ = _dispatchers([(d, lead) for d, lead, _ in found])
    return dispatchers, leader, pools([workers for _, _, workers in found])


def dispatchers(parts: Sequence[Redbike]) -> tuple[list[dict[str, Any]], str | None, list[str | None]]:
    """Every part's dispatchers, each with its ``shard``; the identity that
    leads every shard, if one does (else None); each shard's leader."""
    return _dispatchers([(shown, leader) for shown, leader, _ in
                         (overview.processes(part.client, part.keys) for part in parts)])


def queues(parts: Sequence[Redbike], now: float, workers: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """overview.queues over every part, merged by name: the queues the pools
    (``workers``, read if not given) name or that hold jobs."""
    if workers is None:
        workers = processes(parts)[2]
    known = [q for w in workers for q in w.get("queues", [])]
    return merge_queues([overview.queues(part.client, part.keys, known, now) for part in parts])


def totals(parts: Sequence[Redbike]) -> dict[str, stats.QueueTotals]:
    """stats.totals summed over every part."""
    return _summed([stats.totals(part.client, part.keys) for part in parts])


def per_minute(parts: Sequence[Redbike], now: float, minutes: int = 60) -> list[tuple[int, dict[str, stats.QueueTotals]]]:
    """stats.per_minute over every part, each minute's counts summed over the parts that know it."""
    if len(parts) == 1:
        return stats.per_minute(parts[0].client, parts[0].keys, now, minutes)
    by_minute: dict[int, list[dict[str, stats.QueueTotals]]] = {}
    for part in parts:
        for start, counts in stats.per_minute(part.client, part.keys, now, minutes):
            by_minute.setdefault(start, []).append(counts)
    return [(start, _summed(by_minute[start])) for start in sorted(by_minute)]


# -- merging ---------------------------------------------------------------------


def _dispatchers(found: list[tuple[list[dict[str, Any]], str | None]]
                 ) -> tuple[list[dict[str, Any]], str | None, list[str | None]]:
    """Every shard's dispatchers with their ``shard``; the identity leading
    every shard, if one does (else None); each shard's leader."""
    dispatchers = [dict(d, shard=index) for index, (shown, _) in enumerate(found) for d in shown]
    leaders = [leader for _, leader in found]
    common = leaders[0] if len(set(leaders)) == 1 else None
    return dispatchers, common, leaders


def pools(per_part: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The worker pools of every part, one per identity (a pool that claims
    from several shards registers on each): its slots' runs merged, the
    shards it is registered on (``shards``, over several parts)."""
    if len(per_part) == 1:
        return per_part[0]
    merged: dict[str, dict[str, Any]] = {}
    for index, entries in enumerate(per_part):
        for entry in entries:
            pool = merged.get(str(entry.get("identity")))
            if pool is None:
                merged[str(entry.get("identity"))] = dict(entry, shards=[index])
                continue
            pool["shards"].append(index)
            pool["running"] = _slots([*pool.get("running", []), *entry.get("running", [])])
            if entry.get("stopping"):
                pool["stopping"] = True
            if "refreshed" in entry:
                pool["refreshed"] = max(float(pool.get("refreshed", 0)), float(entry["refreshed"]))
    return sorted(merged.values(), key=lambda e: (str(e.get("host")), str(e.get("pid")), str(e.get("identity"))))


def _slots(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A pool's slots as its entries on several shards show them: each run
    once, and a slot idle only if no shard shows it running a job."""
    busy = {(r["slot"], r["jobid"], r.get("token")): r for r in runs if r.get("jobid") is not None}
    working = {slot for slot, _, _ in busy}
    idle = {r["slot"]: r for r in runs if r.get("jobid") is None and r["slot"] not in working}
    return sorted([*busy.values(), *idle.values()], key=lambda r: int(r["slot"]))


def merge_queues(per_part: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """overview.queues' rows of every part, one per queue: counts and rates
    summed, the oldest waiting job the oldest of all, paused if paused on any."""
    if len(per_part) == 1:
        return per_part[0]
    merged: dict[str, dict[str, Any]] = {}
    for rows in per_part:
        for row in rows:
            have = merged.get(row["queue"])
            if have is None:
                merged[row["queue"]] = dict(row)
                continue
            for name in QUEUE_COUNTS:
                have[name] += row[name]
            olds = [t for t in (have["oldest_since"], row["oldest_since"]) if t is not None]
            have["oldest_since"] = min(olds) if olds else None
            have["paused"] = have["paused"] or row["paused"]
            for window in RATE_WINDOWS:
                have[window] = _rates(have[window], row[window])
    return [merged[name] for name in sorted(merged)]


def _rates(one: dict[str, float] | None, other: dict[str, float] | None) -> dict[str, float] | None:
    if one is None or other is None:
        return one if other is None else other
    return {what: round(one.get(what, 0.0) + other.get(what, 0.0), 2) for what in one.keys() | other.keys()}


def _statuses(counted: list[dict[str, int] | None]) -> dict[str, int] | None:
    if any(counts is None for counts in counted):
        return None
    summed = Counter[str]()
    for counts in counted:
        summed.update(counts or {})
    return dict(sorted(summed.items()))


def _failures(found: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Every part's failures of the last hour: the count summed, the most recent of all."""
    if any(failed is None for failed in found):
        return None
    shown = [f for failed in found if failed is not None for f in failed["recent"]]
    recent = sorted(shown, key=lambda f: (f["at"], f["jobid"]), reverse=True)[:overview.FAILURES_SHOWN]
    return {"window_seconds": overview.FAILURE_WINDOW, "count": sum(f["count"] for f in found if f is not None),
            "recent": recent}


def _summed(counted: list[dict[str, stats.QueueTotals]]) -> dict[str, stats.QueueTotals]:
    summed: dict[str, stats.QueueTotals] = {}
    for counts in counted:
        for queue, one in counts.items():
            summed[queue] = summed[queue].plus(one) if queue in summed else one
    return dict(sorted(summed.items()))


def _servers(parts: Sequence[Redbike]) -> list[list[int]]:
    """The parts' indexes grouped by Redis server: by client (on one server
    all share one: no command), else by each server's run_id."""
    by_client: dict[int, list[int]] = {}
    for index, part in enumerate(parts):
        by_client.setdefault(id(part.client), []).append(index)
    if len(by_client) == 1:
        return list(by_client.values())
    by_server: dict[str, list[int]] = {}
    for indexes in by_client.values():
        run_id = str(parts[indexes[0]].client.info("server").get("run_id"))
        by_server.setdefault(run_id, []).extend(indexes)
    return sorted(sorted(group) for group in by_server.values())
