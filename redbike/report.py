"""Read-only views of the job registry: the CSV dumps and tell.

They stream with HSCAN, so a million jobs never sit in memory at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import redis

from .keys import Keys
from .parking import Parked, SetAside, decode_parking, parked_lines
from .records import (
    JobRecord,
    RecordError,
    decode_job,
    decode_lease,
    decode_placement,
    decode_status,
)
from .schedules import ScheduleError, parse_schedule

SCAN_COUNT = 1000


def statuses(client: redis.Redis, keys: Keys, before: float | None = None) -> Iterator[tuple[str, str, int]]:
    """(jobid, EVENT, timestamp) of every job, or of those whose last status
    is older than ``before``."""
    for jobid, value in client.hscan_iter(keys.statuses, count=SCAN_COUNT):
        event, stamp = decode_status(value)
        if before is None or stamp < before:
            yield jobid, event, int(stamp)


def schedules(client: redis.Redis, keys: Keys) -> Iterator[tuple[str, str]]:
    """(jobid, schedule) of every job."""
    yield from client.hscan_iter(keys.schedules, count=SCAN_COUNT)


def capacities(client: redis.Redis, keys: Keys) -> Iterator[tuple[str, int | None, int, int]]:
    """(resource, capacity or None for unlimited, in use, jobs waiting for it:
    in line, or aside as they need more than its capacity) of every resource
    that has a capacity or is in use."""
    capacity = dict(client.hscan_iter(keys.capacities, count=SCAN_COUNT))
    usage = dict(client.hscan_iter(keys.usage, count=SCAN_COUNT))
    for resource in sorted(capacity.keys() | usage.keys()):
        bounds = keys.parked_range(resource)
        waiting = client.zlexcount(keys.parked, *bounds) + client.zlexcount(keys.aside, *bounds)
        limit = capacity.get(resource)
        yield resource, None if limit is None else int(limit), int(usage.get(resource, 0)), waiting


class JobState(NamedTuple):
    """One job's values in the job-state keys, read in one round trip."""

    status: str | None
    schedule: str | None
    next_run: float | None  # its timeline score
    lease: str | None
    deadline: float | None
    error: str | None
    pending: str | None
    needs: str | None
    parking: str | None
    job: str | None
    data: str | None  # its payload, as stored


TOLD_DATA_CHARS = 200  # tell shows a payload's JSON up to this long, then "..."


def job_state(client: redis.Redis, keys: Keys, jobid: str) -> JobState:
    with client.pipeline(transaction=False) as pipe:
        pipe.hget(keys.statuses, jobid)
        pipe.hget(keys.schedules, jobid)
        pipe.zscore(keys.timeline, jobid)
        pipe.hget(keys.leases, jobid)
        pipe.zscore(keys.deadlines, jobid)
        pipe.hget(keys.errors, jobid)
        pipe.hget(keys.parking, jobid)
        pipe.hget(keys.jobs, jobid)
        pipe.hget(keys.data, jobid)
        status, schedule, next_run, lease, deadline, error, parking, job, data = pipe.execute()
    try:
        record = decode_job(job)
    except RecordError:
        record = JobRecord()
    return JobState(status, schedule, next_run, lease, deadline, error, record.pending or None, record.needs or None,
                    parking, job, data)


def tell(client: redis.Redis, keys: Keys, jobid: str, queue: str) -> dict[str, Any] | None:
    """Everything known about one job, or None if there is no such job or run.

    ``queue`` is the job's queue (from the worker's queue_for), shown when the
    job waits in it.
    """
    return told_of(client, keys, job_state(client, keys, jobid), queue)


def told_of(client: redis.Redis, keys: Keys, state: JobState, queue: str) -> dict[str, Any] | None:
    """tell's dict of a job's state (None: no such job or run)."""
    status, schedule, next_run, lease, deadline, error, pending, needs, parking, job, data = state
    if status is None and schedule is None and lease is None:
        return None
    told: dict[str, Any] = {"status": status, "next_run": next_run, "schedule": schedule}
    if needs:
        told["needs"] = needs
    if data:
        told["data"] = data if len(data) <= TOLD_DATA_CHARS else data[:TOLD_DATA_CHARS] + "..."
    told.update(_occurrence(job, status, next_run, schedule))
    if status and status.startswith("ENQ:"):
        told["queue"] = queue
        told["queue_length"] = client.llen(keys.queue(queue))
        if parking:
            told["waiting_for"] = _waiting_for(parking)
    if lease:
        try:
            held = decode_lease(lease)
        except RecordError as exc:
            told["lease"] = {"unreadable": str(exc), "deadline": deadline}
        else:
            told["lease"] = {
                "worker": held.worker,
                "queue": held.queue,
                "since": held.since,
                "timeout": held.timeout,
                "deadline": deadline,
                "token": held.token,
                "holds": held.needs or None,
            }
        if schedule is None:
            told["unset"] = "running; removed when this run ends"
    if pending:
        told["after_this_run"] = _after_this_run(pending)
    if error:
        told["last_error"] = json.loads(error)
    if status:
        told["event"], told["since"] = decode_status(status)
    return told


def _occurrence(job: str | None, status: str | None, next_run: float | None, schedule: str | None) -> dict[str, Any]:
    """The job record as tell shows it: the occurrence it waits in its queue
    or runs for (``due``), the next after it (``next_run``), the attempt, the
    policy and the ledger."""
    try:
        record = decode_job(job)
    except RecordError as exc:
        return {"job_record": str(exc)}
    told: dict[str, Any] = {"misfire": record.misfire, "retries": record.retries}
    event = decode_status(status)[0] if status else ""
    if event in ("ENQ", "WRK") and record.due is not None:
        told["due"] = record.due
        if schedule and next_run is None:
            told["next_run"] = _after(schedule, record.due)
    if event in ("ENQ", "WRK", "RTY", "EXP") or record.attempt > 1:
        told["attempt"] = record.attempt
    told["ledger"] = {"fired": record.fired, "coalesced": record.coalesced, "skipped": record.skipped,
                      "cancelled": record.cancelled, "last_due": record.last_due}
    return told


def _after(schedule: str, due: float) -> float | None:
    """The occurrence after ``due`` of a recurring schedule (None for others)."""
    try:
        parsed = parse_schedule(schedule)
    except ScheduleError:
        return None
    return parsed.first_after(due) if parsed.kind in ("RRULE", "CRON") else None


def _waiting_for(parking: str) -> str:
    try:
        place = decode_parking(parking)
    except RecordError as exc:
        return str(exc)
    if isinstance(place, Parked):  # in line for one resource, or for one per path (replicas): any wakes it
        return " or ".join(line.resource for line in parked_lines(parking))
    if isinstance(place, SetAside):
        return f"needs {place.aside.amount} of {place.aside.resource}, capacity {place.capacity}"
    return "nothing: a resource freed up; the next claim of its queue takes it"


def _after_this_run(pending: str) -> str:
    try:
        kind, at, status = decode_placement(pending)[:3]
    except RecordError as exc:
        return str(exc)
    return {"Q": "enqueue", "T": f"timeline at {at}", "S": status}.get(kind, kind)
