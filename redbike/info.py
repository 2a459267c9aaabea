"""`redbike info`: the overview (overview.py) as one screen of text, with
UTC times and ages. `redbike top` shows the same sections, each a table
(the rows come from here, so the two always agree).
"""

from __future__ import annotations

from typing import Any

from .explain import ago, span, utc

SECTIONS = ("queues", "workers", "failures", "resources")


def where(shown: dict[str, Any]) -> str:
    """The prefix, and over shards how many."""
    return f"prefix {shown['prefix']}" + (f", {shown['shards']} shards" if "shards" in shown else "")


def redis_line(shown: dict[str, Any]) -> str:
    """The Redis server; over shards on several, each with its shards."""
    if "servers" in shown:
        return "; ".join(f"{_server_line(r)} (shards {','.join(map(str, r['shards']))})" for r in shown["servers"])
    return _server_line(shown["redis"])


def _server_line(r: dict[str, Any]) -> str:
    up = "" if r.get("uptime_seconds") is None else f", up {span(float(r['uptime_seconds']))}"
    line = f"Redis {r.get('version')}, {r.get('used_memory_human')} used{up}"
    if "embedded" in r:
        e = r["embedded"]
        return f"{line}; embedded: pid {e['pid']}, socket {e['socket']}, folder {e['folder']}"
    return f"{line}; at {r.get('address')}"


def dispatcher_lines(shown: dict[str, Any]) -> list[str]:
    """The leader and standbys; over shards, those of each shard (its own lease)."""
    if "shards" not in shown:
        return _leader_lines(shown["dispatchers"], shown["leader"], shown["at"], "")
    return [line for shard, leader in enumerate(shown["leaders"])
            for line in _leader_lines([d for d in shown["dispatchers"] if d["shard"] == shard], leader, shown["at"],
                                      f"shard {shard}: ")]


def _leader_lines(dispatchers: list[dict[str, Any]], leader: str | None, now: float, label: str) -> list[str]:
    lines = [f"  {label}{'leader ' if d['leads'] else 'standby'}  {d['identity']}  (v{d.get('version')}, "
             f"started {ago(d['started'], now)})" for d in sorted(dispatchers, key=lambda d: not d["leads"])]
    if not any(d["leads"] for d in dispatchers):
        held = f" (the lease is held by {leader}, not registered)" if leader else ""
        lines.insert(0, f"  {label}no leading dispatcher{held}")
    return lines


QUEUE_HEADER = ("queue", "waiting", "parked", "ready", "aside", "running", "oldest waits",
                "done/min 5m 60m", "failed/min 5m 60m")


def _per_minute(q: dict[str, Any], what: str) -> str:
    return " ".join("-" if q.get(window) is None else f"{q[window][what]:g}" for window in ("per_minute_5m", "per_minute_60m"))


def queue_rows(shown: dict[str, Any]) -> list[tuple[str, ...]]:
    now = shown["at"]
    return [(q["queue"] + (" (paused)" if q.get("paused") else ""), str(q["waiting"]), str(q["parked"]),
             str(q["ready"]), str(q["aside"]), str(q["running"]),
             "" if q["oldest_since"] is None else span(now - q["oldest_since"]),
             _per_minute(q, "done"), _per_minute(q, "failed")) for q in shown["queues"]]


WORKER_HEADER = ("worker", "slot", "runs", "for", "queue", "lease token")


def worker_rows(shown: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per slot: a pool's first row names it (queues, slots, resources)."""
    now = shown["at"]
    rows: list[tuple[str, ...]] = []
    for w in shown["workers"]:
        resources = ",".join(f"{k}={v}" for k, v in w.get("resources", {}).items())
        name = (f"{w['identity']}  queues {':'.join(w.get('queues', []))}, {w.get('slots')} slot(s)"
                f"{', resources ' + resources if resources else ''}, started {ago(w['started'], now)}"
                f"{', stopping' if w.get('stopping') else ''}")
        rows.append((name, "", "", "", "", ""))
        for slot in w.get("running", []):
            if slot.get("jobid") is None:
                rows.append(("", str(slot["slot"]), "idle", "", "", ""))
            else:
                rows.append(("", str(slot["slot"]), slot["jobid"], span(now - slot["since"]), slot.get("queue", ""),
                             slot.get("token", "")))
    return rows


FAILURE_HEADER = ("when", "job", "status", "error", "worker")


def failure_rows(shown: dict[str, Any]) -> list[tuple[str, ...]]:
    now = shown["at"]
    if shown["failures"] is None:
        return []
    return [(f"{utc(f['at'])} ({ago(f['at'], now)})", f["jobid"], str(f["status"]), str(f["error"])[:120],
             str(f["worker"])) for f in shown["failures"]["recent"]]


RESOURCE_HEADER = ("resource", "in use", "capacity", "waiting")


def resource_rows(shown: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(r["resource"], str(r["in_use"]), "unlimited" if r["capacity"] is None else
             f"{r['capacity']}{' (paused)' if r['capacity'] == 0 else ''}", str(r["waiting"]))
            for r in shown["resources"]]


def status_line(shown: dict[str, Any]) -> str:
    counts = shown["statuses"]
    if counts is None:
        return "not counted"
    if not counts:
        return "no jobs"
    return ", ".join(f"{event} {n}" for event, n in counts.items()) + f"  ({sum(counts.values())} jobs)"


def failures_title(shown: dict[str, Any]) -> str:
    failed = shown["failures"]
    if failed is None:
        return "Failures in the last hour: not counted"
    more = f", the {len(failed['recent'])} latest:" if failed["count"] > len(failed["recent"]) else ""
    return f"Failures in the last hour: {failed['count']}{more}"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell (the last one left as it is)."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    return [(indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1]).rstrip()
            for row in [header, *rows]]


def lines(shown: dict[str, Any]) -> list[str]:
    """The whole overview, for `redbike info`."""
    busy = sum(1 for w in shown["workers"] for s in w.get("running", []) if s.get("jobid") is not None)
    slots = sum(int(w.get("slots") or 0) for w in shown["workers"])
    out = [f"redbike ({where(shown)}) at {utc(shown['at'])}", redis_line(shown),
           f"Dispatchers: {len(shown['dispatchers'])}", *dispatcher_lines(shown),
           f"Workers: {len(shown['workers'])} pool(s), {slots} slot(s), {busy} busy"]
    for row in worker_rows(shown):
        out.append(f"  {row[0]}" if row[0] else f"    slot {row[1]}: {row[2]}"
                   + (f" for {row[3]} (queue {row[4]}, token {row[5]})" if row[3] else ""))
    out.append(f"Queues: {len(shown['queues'])}")
    out += table(QUEUE_HEADER, queue_rows(shown))
    out.append(f"Statuses: {status_line(shown)}")
    resources = resource_rows(shown)
    out.append(f"Resources at or near capacity: {len(resources) or 'none'}")
    out += table(RESOURCE_HEADER, resources)
    out.append(failures_title(shown))
    out += [f"  {when}  {job}  {status}  {error}  (worker {worker})" for when, job, status, error, worker
            in failure_rows(shown)]
    return out
