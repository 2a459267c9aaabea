"""What the web UI's pages show beyond the overview (overview.py) and the
API's job listing (listing.py): who holds and who waits for each resource,
and the next occurrences of a job's schedule. Read-only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, cast

import redis

from ..api import Redbike
from ..explain import readable_needs, running_leases
from ..keys import Keys
from ..preview import preview
from ..records import RecordError, decode_aside, decode_parked
from ..schedules import ScheduleError, parse_schedule

WAITERS_SHOWN = 20  # jobs in line for a resource listed, with a count of all
OCCURRENCES_SHOWN = 5


def queue_of(bike: Redbike, jobid: str) -> str:
    """The job's queue by the worker's routing ("" if it refuses the id)."""
    try:
        return bike.worker.queue_for(jobid)
    except Exception:  # noqa: BLE001 - the worker's own code: a job id it cannot route shows no queue
        return ""


def next_runs(client: redis.Redis, keys: Keys, jobs: list[dict[str, Any]]) -> None:
    """Add each listed job's next run (its timeline score, or None), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.zscore(keys.timeline, job["jobid"])
        for job, score in zip(jobs, pipe.execute(), strict=True):
            job["next_run"] = score


def resources(bike: Redbike) -> list[dict[str, Any]]:
    """Every resource with a capacity or in use: capacity, in use, and the
    jobs holding it (from the leases, one HSCAN) and waiting for it (in
    line, or set aside as they need more than its capacity; the first
    WAITERS_SHOWN)."""
    client, keys = bike.client, bike.keys
    holders: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for jobid, lease in running_leases(client, keys):
        for resource, amount in readable_needs(lease.needs).items():
            holders[resource].append({"jobid": jobid, "amount": amount, "worker": lease.worker,
                                      "since": lease.since})
    shown = []
    for resource, capacity, in_use, waiting in bike.capacities():
        bounds = keys.parked_range(resource)
        waiters: list[dict[str, Any]] = []
        for member in cast("list[str]", client.zrangebylex(keys.parked, *bounds, start=0, num=WAITERS_SHOWN)):
            try:
                parked = decode_parked(member)
            except RecordError:
                continue
            waiters.append({"jobid": parked.jobid, "queue": parked.queue, "amount": None})
        room = WAITERS_SHOWN - len(waiters)
        for member in cast("list[str]", client.zrangebylex(keys.aside, *bounds, start=0, num=room) if room else []):
            try:
                aside = decode_aside(member)
            except RecordError:
                continue
            waiters.append({"jobid": aside.jobid, "queue": aside.queue, "amount": aside.amount})
        shown.append({"resource": resource, "capacity": capacity, "in_use": in_use, "waiting": waiting,
                      "holders": sorted(holders.get(resource, []), key=lambda h: h["since"]),
                      "waiters": waiters})
    return shown


def occurrences(schedule: str | None, now: float, count: int = OCCURRENCES_SHOWN) -> dict[str, Any]:
    """The next ``count`` occurrences of ``schedule`` after ``now`` (each
    due, and what DST did to it) and the notes that say why there are none
    or fewer (a control word, an ended rule, an unparsable schedule)."""
    if not schedule:
        return {"zone": None, "due": [], "notes": []}
    try:
        parsed = parse_schedule(schedule)
    except ScheduleError as exc:
        return {"zone": None, "due": [], "notes": [f"schedule not understood: {exc}"]}
    shown = preview(parsed, now, count)
    return {"zone": parsed.zone.key,
            "due": [{"at": o.due, "local": o.local.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "marks": [m.note for m in o.marks]} for o in shown.occurrences],
            "notes": shown.notes}
