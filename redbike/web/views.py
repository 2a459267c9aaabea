"""What the web UI's pages show beyond the overview (overview.py) and the
API's job listing (listing.py): who holds and who waits for each resource,
and the next occurrences of a job's schedule. Read-only.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, cast

from ..api import Redbike
from ..explain import readable_needs, running_leases
from ..parking import decode_aside, decode_parked
from ..preview import preview
from ..records import RecordError
from ..schedules import ScheduleError, parse_schedule
from ..sharded import ShardedRedbike

WAITERS_SHOWN = 20  # jobs in line for a resource listed, with a count of all
OCCURRENCES_SHOWN = 5
SCAN_EVERY = 10.0  # as `top`: the scans take at most a tenth of the time between them


class Overviews:
    """The overview for the pages, which any number of browser tabs reload
    every few seconds: the parts that scan every job (counts per status,
    failures) are read again only once their last read is ``min_age`` old
    and at least SCAN_EVERY times its own cost, as `top` does, so tabs open
    on a million jobs do not keep Redis scanning. In between, those parts
    are the last read's, with its time as ``counted_at``."""

    def __init__(self, min_age: float) -> None:
        self.min_age = min_age
        self.lock = threading.Lock()
        self.scanned_at, self.cost = float("-inf"), 0.0
        self.scanned: tuple[Any, Any, float] | None = None

    def read(self, bike: Redbike | ShardedRedbike) -> dict[str, Any]:
        with self.lock:
            started = time.monotonic()
            scan = started - self.scanned_at >= max(self.min_age, SCAN_EVERY * self.cost)
            if scan:
                self.scanned_at = started  # a request meanwhile does not scan too
        shown = bike.overview(scan=scan)
        with self.lock:
            if scan:
                self.cost = time.monotonic() - started
                self.scanned = (shown["statuses"], shown["failures"], shown["at"])
            elif self.scanned is not None:  # (None: the first scan is still under way)
                shown["statuses"], shown["failures"], shown["counted_at"] = self.scanned
        return shown


def queue_of(bike: Redbike | ShardedRedbike, jobid: str) -> str:
    """The job's queue by the worker's routing ("" if it refuses the id)."""
    try:
        return bike.worker.queue_for(jobid)
    except Exception:  # noqa: BLE001 - the worker's own code: a job id it cannot route shows no queue
        return ""


def next_runs(parts: list[Redbike], jobs: list[dict[str, Any]]) -> None:
    """Add each listed job's next run (its timeline score, or None), in one
    round trip per shard (a job listed over shards says its ``shard``)."""
    for index, part in enumerate(parts):
        mine = [job for job in jobs if job.get("shard", 0) == index]
        if not mine:
            continue
        with part.client.pipeline(transaction=False) as pipe:
            for job in mine:
                pipe.zscore(part.keys.timeline, job["jobid"])
            for job, score in zip(mine, pipe.execute(), strict=True):
                job["next_run"] = score


def resources(parts: list[Redbike]) -> list[dict[str, Any]]:
    """Every resource with a capacity or in use: capacity, in use, and the
    jobs holding it (from the leases, one HSCAN) and waiting for it (in
    line, or set aside as they need more than its capacity; the first
    WAITERS_SHOWN). Over shards, each shard's (a resource lives on one)."""
    return [shown for part in parts for shown in _resources(part)]


def _resources(bike: Redbike) -> list[dict[str, Any]]:
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
