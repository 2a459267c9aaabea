"""redbike explain: a job's trail, one line per event, and why it is not running.

The trail (in the job's value in P:jobs, records.trail_of) is written by the scripts that
move the job; this module only reads it, with the job's current state
(report.job_state, as tell reads it) and, to answer "why isn't it
running?", the few keys that say what it waits for: the resource's
capacity, usage and holders (an HSCAN of the leases), its place in line or
in its queue. Read-only: runtime code never imports it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .keys import Keys
from .nodes import INSTANCE
from .nodeview import task_of
from .occurrences import Retry
from .parking import LINES_SEP, Parked, SetAside, decode_parking, encode_parked, parked_lines
from .records import (
    LeaseRecord,
    RecordError,
    TrailEvent,
    decode_alternatives,
    decode_job,
    decode_lease,
    decode_status,
    decode_trail_event,
    trail_of,
)
from .report import SCAN_COUNT, JobState, job_state, told_of

HOLDERS_SHOWN = 5  # holders of a full resource named before "and N more"
IDLE_QUEUE_SECONDS = 60.0  # a job queued this long, with no job of its queue running, says so


@dataclass(frozen=True)
class Explanation:
    """A job's trail (oldest first; a string for an event that cannot be
    decoded), its state as tell shows it (None: the job is gone) and one
    sentence saying why it is not running (or that it is)."""

    jobid: str
    events: list[TrailEvent | str]
    state: dict[str, Any] | None
    why: str
    now: float  # when it was read: the ages count from it
    task: dict[str, Any] | None = None  # a task of the node model: its family, node and path (nodeview.task_of)

    def timeline(self) -> list[tuple[float, str]]:
        """(time, text) of each event of the trail, oldest first (a run gives
        two: its claim and its end; a running job's claim from its lease)."""
        state = self.state or {}
        timeline = _timeline(self.events, int(state.get("retries", 0)))
        lease = state.get("lease") or {}
        if "worker" in lease:  # the trail has a run once it ends: this one's claim comes from its lease
            _insert(timeline, lease["since"], _claimed({
                "worker": lease["worker"], "due": str(state.get("due", "")), "attempt": str(state.get("attempt", 1)),
                "token": lease["token"]}) + "; running")
        return timeline

    def lines(self) -> list[str]:
        """The trail, one line per event, each with its UTC time and age; then the sentence."""
        now = self.now
        shown = [f"{utc(at)}  ({ago(at, now)})  {text}" for at, text in self.timeline()]
        return [*shown, *([task_line(self.task, now)] if self.task else []), self.why]

    def as_json(self) -> dict[str, Any]:
        events = [{"at": None, "event": "unreadable", "raw": event} if isinstance(event, str)
                  else {"at": event.at, "event": event.event, **event.fields} for event in self.events]
        return {"jobid": self.jobid, "events": events, "state": self.state, "task": self.task, "why": self.why}


def task_line(task: dict[str, Any], now: float) -> str:
    """``task of scan on node db3, path instance > db-host-17 (host) > db3 (db)``, and since when it is an orphan."""
    path = _path_text(task["path"])
    known = len(task["path"]) > 1  # more than the instance: the node is stored
    line = f"task of {task['family']} on node {task['node']}, " + (f"path {path}" if known else "a node no longer known")
    if "paths" in task:  # replicas
        line += f" (or {' or '.join(_path_text(other) for other in task['paths'][1:])})"
    if "path_taken" in task:
        line += f"; runs on path {_path_text(task['path_taken'])}"
    if "orphaned_since" in task:
        since = task["orphaned_since"]
        line += f"; orphaned {utc(since)} ({ago(since, now)}): its node vanished while it ran"
    return line


def _path_text(path: list[dict[str, str]]) -> str:
    return " > ".join(step["name"] if step["level"] == INSTANCE else f"{step['name']} ({step['level']})"
                      for step in path)


def explain(client: redis.Redis, keys: Keys, jobid: str, queue: str, now: float) -> Explanation | None:
    """The explanation of job ``jobid`` (of queue ``queue``), or None when it
    has neither a state nor a trail."""
    state = job_state(client, keys, jobid)
    told = told_of(client, keys, state, queue)
    events = [_decoded(value) for value in trail_of(state.job)]
    if told is None and not events:
        return None
    return Explanation(jobid, events, told, _why(client, keys, jobid, queue, state, told, events, now), now,
                       task_of(client, keys, jobid))


def _decoded(value: str) -> TrailEvent | str:
    try:
        return decode_trail_event(value)
    except RecordError:
        return value


# -- times ---------------------------------------------------------------------

def utc(at: float) -> str:
    """``2026-12-01 10:15:02Z``."""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def ago(at: float, now: float) -> str:
    """How long before ``now`` (``3 min ago``) or after it (``in 2 h``)."""
    delta = now - at
    if abs(delta) < 1:
        return "now"
    rough = _rough(abs(delta))
    return f"{rough} ago" if delta > 0 else f"in {rough}"


def _rough(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def span(seconds: float) -> str:
    """A duration: ``2.5 s``, ``4 min 5 s``, ``2 h 3 min``."""
    if seconds < 60:
        return f"{max(seconds, 0.0):.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def _when(text: str, now: float | None = None) -> str:
    """A stored time as UTC, with its age from ``now`` if given ('?' if none)."""
    at = _number(text)
    if at is None:
        return "?"
    return utc(at) if now is None else f"{utc(at)} ({ago(at, now)})"


def _number(text: str | float | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


# -- the trail, line by line ---------------------------------------------------

def _timeline(events: list[TrailEvent | str], retries: int) -> list[tuple[float, str]]:
    """(time, text) of each event, oldest first. A run also gives the line of
    its claim, at its claim time, placed among the events before its end."""
    lines: list[tuple[float, str]] = []
    last = 0.0
    for event in events:
        if isinstance(event, str):
            lines.append((last, f"unreadable event {event!r}"))
            continue
        last = event.at
        if event.event == "run":
            since = _number(event.fields["since"])
            if since is not None:
                _insert(lines, since, _claimed(event.fields))
        lines.append((event.at, _describe(event, retries)))
    return lines


def _insert(lines: list[tuple[float, str]], at: float, text: str) -> None:
    """Add a line at time ``at``, after every line not later than it."""
    where = len(lines)
    while where and lines[where - 1][0] > at:
        where -= 1
    lines.insert(where, (at, text))


def _describe(event: TrailEvent, retries: int) -> str:
    f = event.fields
    name = event.event
    if name == "set":
        needs = f", needs {f['needs']}" if f["needs"] else ""
        return (f'set by {f["by"]}: schedule "{f["schedule"]}"{needs}, misfire {f["misfire"]}, '
                f'retries {f["retries"]} -> {f["status"] or "?"}')
    if name == "retry":
        return f"retry by {f['by']}: put back at once with a fresh attempt count"
    if name == "unset":
        return f"unset by {f['by']}"
    if name == "cancelled":
        count = int(f.get("count") or 1)
        more = f" and {count - 1} more due after it" if count > 1 else ""
        return f"occurrence {_when(f['due'])}{more} cancelled: unset or set again before it ran"
    if name == "enqueued":
        due = _number(f["due"])
        late = f", {span(event.at - due)} late" if due is not None and event.at - due >= 1 else ""
        return f"enqueued for occurrence {_when(f['due'])} (attempt {f['attempt']}{late})"
    if name == "misfire":
        return _misfire(f)
    if name == "parked":
        held = f"{f['in_use'] or '?'}/{f['capacity']}" if f["capacity"] else f"{f['in_use'] or '?'} in use"
        return f"parked: waits in line for {f['resource']} ({held})"
    if name == "aside":
        return f"set aside: needs {f['amount']} of {f['resource']}, capacity {f['capacity']}"
    if name == "woken":
        return f"woken: {f['resource']} has room; the next claim of its queue takes it"
    return _finished(event, retries)


def _misfire(f: dict[str, str]) -> str:
    counts = []
    if f["coalesced"] != "0":
        counts.append(f"{f['coalesced']} missed occurrence(s) coalesced into one run")
    if f["skipped"] != "0":
        counts.append(f"{f['skipped']} skipped")
    due = f" (occurrence {_when(f['due'])})" if f["due"] else ""
    return f"misfire policy {f['policy']}: {' and '.join(counts) or 'nothing missed'}{due}"


def _claimed(f: dict[str, str]) -> str:
    return f"claimed by {f['worker']} for occurrence {_when(f['due'])} (attempt {f['attempt']}), lease token {f['token']}"


def _finished(event: TrailEvent, retries: int) -> str:
    """The end of a run (a 'run' event): how it ended, and what came next."""
    f = event.fields
    since = _number(f["since"])
    ran = f"after {span(event.at - since)}" if since is not None else ""
    status, error, attempt = f["status"], f["error"], int(_number(f["attempt"]) or 1)
    head = f"failed {ran}: {error}" if error else f"finished {ran}"
    after = f["next_at"] and _number(f["next_at"])
    backoff = f" (backoff {span(after - event.at)})" if after else ""
    if status == "RTY":
        return f"{head}; retry {attempt}/{retries} at {_when(f['next_at'])}{backoff}"
    if status == "EXP":
        head = f"did not complete {ran}" + (f": {error}" if error else "")
        limit = Retry.limit(retries, "expired")
        if attempt <= limit:
            return f"{head}; retry {attempt}/{limit} at {_when(f['next_at'])}{backoff}"
        return f"{head}; waits for its next occurrence at {_when(f['next_at'])}"
    tail = {
        "TML": f"next occurrence at {_when(f['next_at'])}",
        "ENQ": "enqueued again at once",
        "END": "no further run (END)",
        "STP": "stopped (STP)",
        "DIE": "no retries left (DIE)",
        "SKP": "skipped by its misfire policy (SKP)",
        "BAD": "its schedule could not be parsed (BAD)",
        "GONE": "the job was unset meanwhile: released (GONE)",
    }.get(status, f"-> {status}")
    return f"{head}; {tail}"


# -- why isn't it running? -----------------------------------------------------

def _why(client: redis.Redis, keys: Keys, jobid: str, queue: str, state: JobState,
         told: dict[str, Any] | None, events: list[TrailEvent | str], now: float) -> str:
    if told is None:
        return _gone(events, now)
    if state.lease:
        return _running(told, now)
    event, since = decode_status(state.status) if state.status else ("", 0.0)
    record = _record(state.job)
    if event == "ENQ":
        if state.parking:
            return _waiting(client, keys, state.parking, state.needs)
        return _queued(client, keys, jobid, queue, since, now)
    next_at = f"{utc(state.next_run)} ({ago(state.next_run, now)})" if state.next_run is not None else None
    error = (told.get("last_error") or {}).get("error") or "no error recorded"
    if event == "RTY" and next_at:
        return f"retrying: attempt {record[0]} of {record[1] + 1} at {next_at}; last error: {error}"
    if event == "EXP" and next_at:
        limit = Retry.limit(record[1], "expired")
        if record[0] > 1:
            return f"its last run did not complete ({error}); retrying: attempt {record[0]} of {limit + 1} at {next_at}"
        return f"its last run did not complete ({error}); next occurrence at {next_at}"
    if event == "TML" and next_at:
        return f"next occurrence at {next_at}"
    return {
        "DIE": f"failed (DIE): {error}; `redbike retry {jobid}` puts it back",
        "STP": "stopped (STP): its schedule is STOP, or its work raised StopWork; set it again to run it",
        "END": "ended (END): a one-off that ran; its schedule has no further run",
        "SKP": f"skipped (SKP) by its misfire policy {told.get('misfire', '?')}: it was too late to run",
        "BAD": f'its schedule "{state.schedule}" could not be parsed (BAD); set it again with a good one',
    }.get(event, f"status {event or 'none'} since {utc(since)} ({ago(since, now)})")


def _record(job: str | None) -> tuple[int, int]:
    """(attempt, retries) of a job record (1, 0 for one that cannot be read)."""
    try:
        record = decode_job(job)
    except RecordError:
        return 1, 0
    return record.attempt, record.retries


def _gone(events: list[TrailEvent | str], now: float) -> str:
    unset = next((e for e in reversed(events) if not isinstance(e, str) and e.event == "unset"), None)
    if unset is not None:
        return f"unset at {utc(unset.at)} ({ago(unset.at, now)}) by {unset.fields['by']}: it will not run again"
    return "gone: it has no schedule, status or lease left, only this trail (until it expires)"


def _running(told: dict[str, Any], now: float) -> str:
    lease = told.get("lease") or {}
    if "worker" not in lease:
        return f"running, but its lease cannot be read: {lease.get('unreadable')}"
    deadline = lease.get("deadline")
    until = f", lease deadline {utc(deadline)} ({ago(deadline, now)})" if deadline is not None else ""
    gone = "; it was unset and is removed when this run ends" if "unset" in told else ""
    return f"running on {lease['worker']} since {utc(lease['since'])} ({ago(lease['since'], now)}){until}{gone}"


def _queued(client: redis.Redis, keys: Keys, jobid: str, queue: str, since: float, now: float) -> str:
    """A job in its queue's list: its place there, and whether anything of the
    queue is running at all (there is no registry of workers: a queue whose
    jobs have waited long and of which none runs probably has no worker)."""
    key = keys.queue(queue)
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(key)
        pipe.lpos(key, jobid, rank=-1)  # from the end the next claim takes (RPOP): near it, quick
        length, index = pipe.execute()
    place = f"position {length - index} of {length}" if index is not None else f"not in its list, of {length}"
    sentence = f"waiting in queue {queue} since {utc(since)} ({ago(since, now)}), {place}"
    if now - since >= IDLE_QUEUE_SECONDS and not any(lease.queue == queue
                                                     for _, lease in running_leases(client, keys)):
        sentence += f"; no job of queue {queue} is running: is a worker working queue {queue}?"
    return sentence


def _waiting(client: redis.Redis, keys: Keys, parking: str, needs: str | None) -> str:
    try:
        place = decode_parking(parking)
    except RecordError as exc:
        return f"waiting, but its parking value cannot be read: {exc}"
    if isinstance(place, SetAside):
        aside = place.aside
        return (f"set aside: needs {aside.amount} of {aside.resource}, capacity {place.capacity}; "
                f"it runs once the capacity is raised to {aside.amount} or its needs lowered")
    if not isinstance(place, Parked):
        return f"woken: {place.resource} has room for it; the next claim of queue {place.ready.queue} takes it"
    if LINES_SEP in parking:
        return _parked_on_paths(client, keys, parked_lines(parking), needs or "")
    return _parked(client, keys, place, readable_needs(needs or "").get(place.resource, 1))


def _parked_on_paths(client: redis.Redis, keys: Keys, lines: list[Parked], needs: str) -> str:
    """A job with alternative paths (replicas) in line on each: which paths are
    full, each named by the nodes only it goes through."""
    try:
        paths = decode_alternatives(needs)
    except RecordError:
        paths = []
    nodes = [{name.rpartition("@")[2] for name in path} for path in paths]
    common = set.intersection(*nodes) if nodes else set()
    parts = []
    for number, path in enumerate(paths, 1):
        label = f"path {number}" + (f" (via {', '.join(sorted(nodes[number - 1] - common))})"
                                    if nodes[number - 1] - common else "")
        place = next((line for line in lines if line.resource in path), None)
        if place is None:
            parts.append(f"{label}: needs more than a capacity, it never has room")
        else:
            parts.append(f"{label}: {_parked(client, keys, place, path[place.resource])}")
    return f"no path has room ({len(paths)} paths; a release on any wakes it): " + "; ".join(parts)


def _parked(client: redis.Redis, keys: Keys, place: Parked, need: int) -> str:
    """A job in line for a resource: what holds the resource, and how many wait before it."""
    resource = place.resource
    low, high = keys.parked_range(resource)
    with client.pipeline(transaction=False) as pipe:
        pipe.hget(keys.capacities, resource)
        pipe.hget(keys.usage, resource)
        pipe.zlexcount(keys.parked, low, "(" + encode_parked(place))
        pipe.zlexcount(keys.parked, low, high)
        capacity, usage, ahead, waiting = pipe.execute()
    in_line = f" ({_ordinal(ahead + 1)} of {waiting} in line)"
    if capacity is None:
        return f"waiting for {resource}{in_line}, which now has no capacity limit: the next claim wakes it"
    if int(capacity) == 0:
        return f"waiting for {resource}{in_line}, which is paused (capacity 0)"
    used = int(usage or 0)
    holders = [(jobid, amount) for jobid, lease in running_leases(client, keys)
               if (amount := readable_needs(lease.needs).get(resource))]
    held = _holders(holders)
    free = int(capacity) - used
    if free <= 0:
        fullness = "which is full"
    elif need > free:
        fullness = f"which has {free} free, not the {need} it needs"
    else:
        fullness = "whose room goes to the jobs ahead of it first"
    sentence = f"waiting for {resource}{in_line}, {fullness}: {used}/{capacity}"
    if held:
        sentence += f" held by {held}"
    aside = used - sum(amount for _, amount in holders)
    if aside > 0:
        sentence += f" ({aside} set aside for woken jobs not yet claimed)"
    return sentence


def _holders(holders: list[tuple[str, int]]) -> str:
    names = sorted(f"{jobid} ({amount})" if amount != 1 else jobid for jobid, amount in holders)
    shown = names[:HOLDERS_SHOWN]
    if len(names) > HOLDERS_SHOWN:
        return f"{', '.join(shown)} and {len(names) - HOLDERS_SHOWN} more"
    return " and ".join([", ".join(shown[:-1]), shown[-1]]) if len(shown) > 1 else "".join(shown)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def running_leases(client: redis.Redis, keys: Keys) -> Iterator[tuple[str, LeaseRecord]]:
    """(jobid, LeaseRecord) of every running job (those unreadable left out)."""
    for jobid, value in client.hscan_iter(keys.leases, count=SCAN_COUNT):
        try:
            yield jobid, decode_lease(value)
        except RecordError:
            continue


def readable_needs(text: str) -> dict[str, int]:
    """A needs record's amounts ({} when it cannot be read)."""
    try:
        return {name: amount for path in decode_alternatives(text) for name, amount in path.items()}
    except RecordError:
        return {}
