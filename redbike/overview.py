"""The one read model behind `redbike info` and `redbike top`: Redis, the
dispatchers and worker pools (from the registry, registry.py), the queues,
counts per status, resources at or near capacity, and recent failures.

Read-only. What can be big is streamed and counted as it is scanned (HSCAN
of the statuses and errors, ZSCAN of the parked and aside jobs), so a
million jobs never sit in memory; what is per queue costs a few commands
each (LLEN, ZLEXCOUNT, the oldest job's status).
"""

from __future__ import annotations

import heapq
import json
import os
from collections import Counter
from typing import Any, cast

import redis

from . import cluster, embedded, registry, stats
from .keys import Keys
from .parking import decode_aside, decode_parked
from .records import RecordError, decode_lease, decode_status
from .report import SCAN_COUNT, capacities
from .sentinel import address

FAILURE_WINDOW = 3600.0  # failures shown: those of the last hour
FAILURES_SHOWN = 20  # the most recent ones, with a count of all
NEAR_CAPACITY = 0.8  # a resource this full (or with jobs waiting, or paused) is shown


def read(client: redis.Redis, keys: Keys, now: float, *, scan: bool = True) -> dict[str, Any]:
    """The overview at ``now`` (Redis' clock). ``scan=False`` leaves out what
    scans every job (``statuses`` and ``failures`` are then None)."""
    dispatchers, leader, workers = processes(client, keys)
    return {
        "at": now,
        "prefix": keys.prefix,
        "redis": redis_info(client),
        "dispatchers": dispatchers,
        "leader": leader,
        "workers": workers,
        "queues": queues(client, keys, [q for w in workers for q in w.get("queues", [])], now),
        "statuses": status_counts(client, keys) if scan else None,
        "resources": busy_resources(client, keys),
        "failures": failures(client, keys, now) if scan else None,
    }


def processes(client: redis.Redis, keys: Keys) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]:
    """The registered dispatchers (each marked ``leads``), the identity of
    the one holding the dispatcher lease, and the registered worker pools."""
    entries = registry.live(client, keys)
    leader = registry.leader_of(cast("str | None", client.get(keys.dispatcher)))
    dispatchers = [dict(p, leads=p.get("identity") == leader) for p in entries if p["role"] == "dispatcher"]
    return dispatchers, leader, [p for p in entries if p["role"] == "worker"]


def redis_info(client: redis.Redis) -> dict[str, Any]:
    """Server version, memory, uptime; for the embedded server (a unix
    socket named as embedded.py names it) its pid, socket and folder."""
    info: dict[str, Any] = client.info()
    shown: dict[str, Any] = {
        "version": info.get("redis_version"), "used_memory": info.get("used_memory"),
        "used_memory_human": info.get("used_memory_human"), "uptime_seconds": info.get("uptime_in_seconds"),
        "pid": info.get("process_id"),
    }
    path = client.connection_pool.connection_kwargs.get("path")
    if path and os.path.basename(path) == embedded.SOCKET_NAME:
        shown["embedded"] = {"pid": info.get("process_id"), "socket": path, "folder": os.path.dirname(path)}
    else:
        shown["address"] = cluster.describe(client) or address(client)
    return shown


def rates(client: redis.Redis, keys: Keys, now: float, seconds: int) -> dict[str, dict[str, float]]:
    """Per queue, runs per minute over (about) the last ``seconds``: done, and
    failed (failed for good, retried or expired); from the counters of
    stats.py, over the time their snapshots cover (none: no rates)."""
    start, counts = stats.since(client, keys, now, seconds)
    if start is None:
        return {}
    minutes = max(now - start, 1.0) / 60
    return {queue: {"done": round(one.done / minutes, 2),
                    "failed": round((one.failed + one.retried + one.expired) / minutes, 2)}
            for queue, one in counts.items()}


def queues(client: redis.Redis, keys: Keys, known: list[str], now: float) -> list[dict[str, Any]]:
    """Each queue that the workers name, holds jobs, has jobs parked, ready,
    set aside or running, or is paused: waiting (its list), parked, ready,
    aside, running, paused, how long its oldest waiting job has waited (its
    ENQ status's time), and its runs done and failed per minute over the last
    5 and 60 minutes (None: not known, e.g. no dispatcher kept the counts)."""
    prefix = keys.queue("")
    names = set(known) | {name[len(prefix):] for name in client.scan_iter(match=keys.queue_pattern(), count=1000)}
    parked, aside, running = Counter[str](), Counter[str](), Counter[str]()
    for member, _ in client.zscan_iter(keys.parked, count=SCAN_COUNT):
        try:
            parked[decode_parked(member).queue] += 1
        except RecordError:
            continue
    for member, _ in client.zscan_iter(keys.aside, count=SCAN_COUNT):
        try:
            aside[decode_aside(member).queue] += 1
        except RecordError:
            continue
    for _, lease in client.hscan_iter(keys.leases, count=SCAN_COUNT):
        try:
            running[decode_lease(lease).queue] += 1
        except RecordError:
            continue
    paused = set(client.smembers(keys.paused))
    names |= set(parked) | set(aside) | set(running) | paused
    ordered = sorted(names)
    with client.pipeline(transaction=False) as pipe:
        for name in ordered:
            pipe.llen(keys.queue(name))
            pipe.lindex(keys.queue(name), -1)  # the next one a claim takes: the oldest
            pipe.zlexcount(keys.ready, f"[{name}|".encode(), f"({name}|".encode() + b"\xff")
        found = pipe.execute()
    oldest = list(found[1::3])
    stamps = cast("list[str | None]", client.hmget(keys.statuses, [j or "" for j in oldest])) if oldest else []
    last_5, last_60 = rates(client, keys, now, 300), rates(client, keys, now, 3600)
    shown = []
    for name, length, jobid, ready, stamp in zip(ordered, found[0::3], oldest, found[2::3], stamps):
        since = decode_status(stamp)[1] if jobid and stamp and stamp.startswith("ENQ:") else None
        shown.append({"queue": name, "waiting": length, "parked": parked[name], "ready": ready,
                      "aside": aside[name], "running": running[name], "oldest_since": since,
                      "paused": name in paused, "per_minute_5m": last_5.get(name), "per_minute_60m": last_60.get(name)})
    return shown


def status_counts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """How many jobs have each status (counted as the statuses are scanned)."""
    counts = Counter[str]()
    for _, value in client.hscan_iter(keys.statuses, count=SCAN_COUNT):
        counts[decode_status(value)[0]] += 1
    return dict(sorted(counts.items()))


def busy_resources(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Resources at or near capacity, paused (capacity 0), or with jobs waiting."""
    shown = []
    for resource, capacity, in_use, waiting in capacities(client, keys):
        if waiting or capacity is not None and (capacity == 0 or in_use >= NEAR_CAPACITY * capacity):
            shown.append({"resource": resource, "capacity": capacity, "in_use": in_use, "waiting": waiting})
    return shown


def failures(client: redis.Redis, keys: Keys, now: float) -> dict[str, Any]:
    """The failures of the last hour (each job's last, kept in the errors
    hash): how many, and the FAILURES_SHOWN most recent."""
    since = now - FAILURE_WINDOW
    count = 0
    recent: list[tuple[float, str, dict[str, Any]]] = []
    for jobid, value in client.hscan_iter(keys.errors, count=SCAN_COUNT):
        try:
            record = json.loads(value)
            at = float(record["at"])
        except (ValueError, TypeError, KeyError):
            continue
        if at < since:
            continue
        count += 1
        item = (at, jobid, record)
        if len(recent) < FAILURES_SHOWN:
            heapq.heappush(recent, item)
        elif item[:2] > recent[0][:2]:
            heapq.heapreplace(recent, item)
    shown = [{"jobid": jobid, "at": at, "status": record.get("status"), "error": record.get("error"),
              "worker": record.get("worker")} for at, jobid, record in sorted(recent, key=lambda i: i[:2], reverse=True)]
    return {"window_seconds": FAILURE_WINDOW, "count": count, "recent": shown}
