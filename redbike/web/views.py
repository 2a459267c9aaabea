"""What the web UI's pages show beyond the overview (overview.py): a page
of the jobs list, who holds and who waits for each resource, and the next
occurrences of a job's schedule. Read-only, and bounded per request: the
jobs list is one HSCAN cursor step after another, never the whole hash.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from .. import states
from ..api import Redbike
from ..explain import readable_needs, running_leases
from ..keys import Keys
from ..preview import preview
from ..records import RecordError, decode_aside, decode_parked, decode_status
from ..schedules import ScheduleError, parse_schedule

STATUSES = (states.TML, states.ENQ, states.WRK, states.RTY, states.EXP, states.DIE, states.END,
            states.STP, states.SKP, states.BAD)
PAGE_SIZE = 50
MAX_SCAN_STEPS = 50  # HSCAN steps one page takes at most: a rare filter gives a short page, not a full scan
WAITERS_SHOWN = 20  # jobs in line for a resource listed, with a count of all
OCCURRENCES_SHOWN = 5


@dataclass
class JobsPage:
    """One page of the jobs list: its rows (jobid, status, since, queue,
    schedule, next run), sorted by id, and the cursor of the next page ("":
    none). ``scanned``: statuses looked at to fill it."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    cursor: str = ""
    scanned: int = 0


def _glob(prefix: str) -> str:
    """An HSCAN MATCH pattern for ids starting with ``prefix``."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", prefix) + "*"


def jobs_page(bike: Redbike, *, status: str = "", queue: str = "", prefix: str = "", cursor: str = "",
              size: int = PAGE_SIZE) -> JobsPage:
    """The jobs whose id starts with ``prefix``, of ``status`` and ``queue``
    (each "": any), from HSCAN cursor ``cursor`` on: steps are taken until
    ``size`` rows are found, the scan ends, or MAX_SCAN_STEPS were taken."""
    client, keys = bike.client, bike.keys
    page = JobsPage()
    at = int(cursor or 0)
    for _ in range(MAX_SCAN_STEPS):
        at, found = cast("tuple[int, dict[str, str]]",
                         client.hscan(keys.statuses, at, match=_glob(prefix), count=size))
        for jobid, value in found.items():
            page.scanned += 1
            event, since = decode_status(value)
            if status and event != status:
                continue
            job_queue = queue_of(bike, jobid)
            if queue and job_queue != queue:
                continue
            page.rows.append({"jobid": jobid, "status": event, "since": since, "queue": job_queue})
        if at == 0 or len(page.rows) >= size:
            break
    page.cursor = str(at) if at else ""
    page.rows.sort(key=lambda row: row["jobid"])
    _add_schedules(client, keys, page.rows)
    return page


def queue_of(bike: Redbike, jobid: str) -> str:
    """The job's queue by the worker's routing ("" if it refuses the id)."""
    try:
        return bike.worker.queue_for(jobid)
    except Exception:  # noqa: BLE001 - the worker's own code: a job id it cannot route shows no queue
        return ""


def _add_schedules(client: redis.Redis, keys: Keys, rows: list[dict[str, Any]]) -> None:
    """Each row's schedule and next run (timeline score), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.hget(keys.schedules, row["jobid"])
            pipe.zscore(keys.timeline, row["jobid"])
        found = pipe.execute()
    for row, schedule, next_run in zip(rows, found[0::2], found[1::2]):
        row["schedule"], row["next_run"] = schedule, next_run


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
