"""The REST API, under /api/v1/: JSON views of the read model the CLI uses
(overview.py, registry.py, Redbike.tell/explain/capacities/nodes, preview.py),
so that `redbike info --json` and GET /api/v1/overview say the same, and the
common writes (set, unset, retry, run now, capacity, pause/resume, HALT),
which need the server's token (security.py).

Each handler is a plain function of the request (and, for writes, the JSON
body) returning the answer's data; ``endpoint`` wraps it:
the write check, the body read, the call in Starlette's thread pool (redis-py
blocks), the CLI's input errors (bad job id, schedule, needs...) as 400.
openapi.py describes every route listed here.

Over shards (``shards = N``) the reads merge every shard's (overviews.py;
the listings page shard after shard, listing.py) and the writes go through
ShardedRedbike to the job's or resource's shard; feeds are summed over the
shards; nodes answer 400.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .. import overviews, scale
from ..feedview import FEED_FIELDS, feeds_over
from ..names import BadName, check_jobid, check_queue, whole_number
from ..preview import preview
from ..resources import ResourceError, check_capacity, check_name
from ..schedules import ScheduleError, parse_schedule, parse_timestamp
from ..sharded import ShardedRedbike
from ..stats import QueueTotals
from . import listing, openapi
from .security import ApiError, check_write

if TYPE_CHECKING:
    from .app import WebContext

PREFIX = "/api/v1"
MAX_BODY = 64 * 1024  # beside the largest payload the bike takes (max-data-bytes)
NEXT_SHOWN = 5  # next occurrences a job's page shows
RUNS_SHOWN = 10
MAX_MINUTES = 24 * 60
BAD_INPUT = (BadName, ScheduleError, ResourceError, ValueError)

Handler = Callable[[Request, dict[str, Any]], Any]


async def _body(request: Request, most: int) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > most:
        raise ApiError(413, f"request body over {most} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def endpoint(context: WebContext, handler: Handler, write: bool = False) -> Callable[[Request], Any]:
    async def handle(request: Request) -> Response:
        body: dict[str, Any] = {}
        if write:
            check_write(request, context.token)
            body = await _body(request, MAX_BODY + context.bike.max_data_bytes)
        try:
            answer = await run_in_threadpool(handler, request, body)
        except BAD_INPUT as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse(answer)

    handle.__doc__ = handler.__doc__
    return handle


def _limit(request: Request) -> int:
    text = request.query_params.get("limit")
    return listing.DEFAULT_LIMIT if text is None else whole_number(text, "limit", 1, listing.MAX_LIMIT)


def _time(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    return None if text is None else parse_timestamp(text)


def _jobid(request: Request) -> str:
    return check_jobid(request.path_params["jobid"])


def _string(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name!r} must be a string")
    return value


def _required(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{name!r} must be given, a string")
    return value


def routes(context: WebContext) -> list[BaseRoute]:
    bike, parts = context.bike, context.parts

    def get_overview(request: Request, _: dict[str, Any]) -> Any:
        """What `redbike info --json` shows (Redbike.overview); ?scan=0 leaves out what scans every job
        (statuses, failures: null)."""
        scan = request.query_params.get("scan", "1")
        if scan not in ("0", "1"):
            raise ApiError(400, f"scan must be 0 or 1, not {scan!r}")
        return bike.overview(scan=scan == "1")

    def get_queues(request: Request, _: dict[str, Any]) -> Any:
        """Every queue a pool works or that holds jobs: waiting, parked, ready, aside, running, oldest_since."""
        return {"queues": overviews.queues(parts, context.clock())}

    def get_queue(request: Request, _: dict[str, Any]) -> Any:
        """A queue's counts and its waiting jobs, oldest first (?cursor=&limit=)."""
        name = check_queue(request.path_params["name"])
        shown = [q for q in overviews.queues(parts, context.clock()) if q["queue"] == name]
        if not shown:
            raise ApiError(404, f"no such queue: {name}")
        page = listing.waiting_over(parts, name, request.query_params.get("cursor"), _limit(request))
        return {**shown[0], **page}

    def get_jobs(request: Request, _: dict[str, Any]) -> Any:
        """Jobs, a page at a time: ?status=DIE,RTY&queue=&prefix=&before=&after=&cursor=&limit=."""
        query = request.query_params
        statuses = None
        if query.get("status"):
            statuses = frozenset(s.strip().upper() for s in query["status"].split(","))
            unknown = sorted(statuses - set(listing.STATUSES))
            if unknown:
                raise ApiError(400, f"unknown status {', '.join(unknown)} (known: {', '.join(listing.STATUSES)})")
        queue = query.get("queue")
        wanted = listing.JobFilter(statuses, check_queue(queue) if queue is not None else None, query.get("prefix"),
                                   _time(request, "before"), _time(request, "after"))
        return listing.jobs_over(parts, wanted, bike.worker.queue_for, query.get("cursor"), _limit(request))

    def get_job(request: Request, _: dict[str, Any]) -> Any:
        """tell's fields (null once unset), the trail and why it is (not) running (explain), its recent runs
        (newest first), last error, next occurrences; 404 when it has neither state nor trail."""
        jobid = _jobid(request)
        explained = bike.explain(jobid)
        if explained is None:
            raise ApiError(404, f"no such job: {jobid}")
        told: dict[str, Any] | None = None  # None: the job is gone (unset), its trail kept for a while
        if explained.state is not None:
            told = dict(explained.state, **({"task": explained.task} if explained.task is not None else {}))
        trail = explained.as_json()["events"]
        runs = [event for event in trail if event["event"] == "run"][::-1][:RUNS_SHOWN]
        shown = {"jobid": jobid, "tell": told, "why": explained.why, "trail": trail, "runs": runs,
                 "last_error": (told or {}).get("last_error"), "next": _next((told or {}).get("schedule"),
                                                                             explained.now)}
        if isinstance(bike, ShardedRedbike):
            shown["shard"] = bike.shards.of(jobid)
        return shown

    def get_workers(request: Request, _: dict[str, Any]) -> Any:
        """The registered worker pools, each slot with the job it runs."""
        return {"workers": overviews.processes(parts)[2]}

    def get_dispatchers(request: Request, _: dict[str, Any]) -> Any:
        """The registered dispatchers (the leader marked ``leads``) and the lease holder's identity; over
        shards, each dispatcher's ``shard`` and each shard's leader (``leaders``)."""
        if context.sharded:
            dispatchers, leader, leaders = overviews.dispatchers(parts)
            return {"dispatchers": dispatchers, "leader": leader, "leaders": leaders}
        dispatchers, leader, _workers = overviews.processes(parts)
        return {"dispatchers": dispatchers, "leader": leader}

    def get_resources(request: Request, _: dict[str, Any]) -> Any:
        """Every resource with a capacity or in use: capacity (null: unlimited), in_use, waiting."""
        return {"resources": [{"resource": r, "capacity": c, "in_use": u, "waiting": w}
                              for r, c, u, w in bike.capacities()]}

    def get_nodes(request: Request, _: dict[str, Any]) -> Any:
        """The node model's nodes (?level=): level, name, parent, tasks, running."""
        return {"nodes": [{"level": lv, "name": n, "parent": p, "tasks": t, "running": r}
                          for lv, n, p, t, r in bike.nodes(level=request.query_params.get("level"))]}

    def get_feeds(request: Request, _: dict[str, Any]) -> Any:
        """Every feed (as `redbike feeds`): name, cursor (JSON), fed, done, failed, waiting, rate, state
        (over shards: the counts summed)."""
        rows = feeds_over([(part.client, part.keys) for part in parts])
        return {"feeds": [dict(zip(FEED_FIELDS, row, strict=True)) for row in rows]}

    def get_scale(request: Request, _: dict[str, Any]) -> Any:
        """`redbike scale --json`: per queue, arrivals, service times, slots and the slots recommended
        (?target=0.9&window=600)."""
        query = request.query_params
        try:
            target = float(query.get("target", scale.DEFAULT_TARGET))
        except ValueError:
            target = math.nan
        if not 0 < target <= 1:
            raise ApiError(400, "'target' must be a utilisation above 0 and at most 1")
        window = whole_number(query.get("window", str(scale.DEFAULT_WINDOW)), "window", 60, 86400)
        return scale.advice_over(parts, bike.clock(), target=target, window=window)

    def get_node(request: Request, _: dict[str, Any]) -> Any:
        """One node: its path to the root, capacities, in use, tasks."""
        shown = bike.node(request.path_params["name"])
        if shown is None:
            raise ApiError(404, f"no such node: {request.path_params['name']}")
        return shown

    def get_stats(request: Request, _: dict[str, Any]) -> Any:
        """Per-minute counts per queue over the last ?minutes= (default 60, at most 1440), oldest first."""
        minutes = whole_number(request.query_params.get("minutes", "60"), "minutes", 1, MAX_MINUTES)
        shown = overviews.per_minute(parts, context.clock(), minutes)
        return {"minutes": [{"at": at, "queues": {q: _totals(t) for q, t in counts.items()}} for at, counts in shown]}

    def get_openapi(request: Request, _: dict[str, Any]) -> Any:
        """This OpenAPI document: every endpoint of the API."""
        return openapi.document(table)

    # -- writes ---------------------------------------------------------------

    def post_job(request: Request, body: dict[str, Any]) -> Any:
        """Set a job: {jobid, schedule, needs?, misfire?, grace?, retries?, data?} (as `redbike set`;
        data: its payload, any JSON value; null drops it; absent keeps it)."""
        jobid, schedule = check_jobid(_required(body, "jobid")), _required(body, "schedule")
        needs = body.get("needs")
        if needs is not None and not isinstance(needs, str | dict):
            raise ApiError(400, "'needs' must be a string (host:a,db:b=2, or none) or an object {resource: amount}")
        retries, grace = body.get("retries"), body.get("grace")
        if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool)):
            raise ApiError(400, "'retries' must be a whole number")
        if grace is not None and (not isinstance(grace, int | float) or isinstance(grace, bool)
                                  or not 0 <= grace <= 10 * 365 * 86400):
            raise ApiError(400, "'grace' must be a number of seconds from 0")
        payload = {"data": body["data"]} if "data" in body else {}
        result = bike.set(jobid, schedule, needs=needs, misfire=_string(body, "misfire"), grace=grace,
                          retries=retries, **payload)
        return {"jobid": jobid, "result": result}

    def delete_job(request: Request, _: dict[str, Any]) -> Any:
        """Unset a job (a running one completes first)."""
        jobid = _jobid(request)
        removed = bike.unset(jobid)
        if removed == 0:
            raise ApiError(404, f"no such job: {jobid}")
        return {"jobid": jobid, "result": "removed" if removed == 1 else "running: removed when its run ends"}

    def retry_job(request: Request, _: dict[str, Any]) -> Any:
        """Put a failed job (DIE) back at once (as `redbike retry`); 409 if it has not failed."""
        jobid = _jobid(request)
        result = bike.retry([jobid])[jobid]
        if result == "NO SUCH JOB":
            raise ApiError(404, f"no such job: {jobid}")
        if result == "NOT FAILED":
            raise ApiError(409, f"{jobid} has not failed (status DIE); left as it is")
        return {"jobid": jobid, "result": result}

    def run_now(request: Request, _: dict[str, Any]) -> Any:
        """Set an existing job's schedule to NOW (its queue and needs kept): it runs once, at once, and ends."""
        jobid = _jobid(request)
        before = bike.schedule_of(jobid)
        if before is None:
            raise ApiError(404, f"no such job: {jobid}")
        return {"jobid": jobid, "result": bike.set(jobid, "NOW"), "schedule_before": before}

    def put_resource(request: Request, body: dict[str, Any]) -> Any:
        """Set a resource's capacity: {capacity: n} (0 pauses it) or {capacity: null} (unlimited)."""
        name = check_name(request.path_params["name"])
        if "capacity" not in body:
            raise ApiError(400, "give {\"capacity\": a whole number, or null for unlimited}")
        capacity = check_capacity(body["capacity"])
        return {"resource": name, "capacity": capacity, "woken": bike.set_capacity(name, capacity)}

    def pause(request: Request, _: dict[str, Any]) -> Any:
        """Pause a queue: workers stop claiming from it (jobs keep becoming due into it)."""
        return _pausing(request, "pause")

    def resume(request: Request, _: dict[str, Any]) -> Any:
        """Resume a paused queue."""
        return _pausing(request, "resume")

    def _pausing(request: Request, verb: str) -> Any:
        name = check_queue(request.path_params["name"])
        changed = bike.pause(name) if verb == "pause" else bike.resume(name)
        return {"queue": name, "paused": verb == "pause", "changed": changed}

    def halt(request: Request, _: dict[str, Any]) -> Any:
        """Tell every running dispatcher and worker to stop after its current job (`redbike control HALT`)."""
        return {"control": bike.control("HALT")}

    def read(path: str, handler: Handler) -> Route:
        return Route(PREFIX + path, endpoint(context, handler), methods=["GET"])

    def write(path: str, method: str, handler: Handler) -> Route:
        return Route(PREFIX + path, endpoint(context, handler, write=True), methods=[method])

    # The routes whose path ends in a verb come before the ones they would be
    # taken for: a job id or queue name may hold '/'.
    table: list[BaseRoute] = [
        read("/openapi.json", get_openapi),
        read("/overview", get_overview),
        read("/queues", get_queues),
        write("/queues/{name:path}/pause", "POST", pause),
        write("/queues/{name:path}/resume", "POST", resume),
        read("/queues/{name:path}", get_queue),
        read("/jobs", get_jobs),
        write("/jobs", "POST", post_job),
        write("/jobs/{jobid:path}/retry", "POST", retry_job),
        write("/jobs/{jobid:path}/run-now", "POST", run_now),
        read("/jobs/{jobid:path}", get_job),
        write("/jobs/{jobid:path}", "DELETE", delete_job),
        read("/workers", get_workers),
        read("/dispatchers", get_dispatchers),
        read("/resources", get_resources),
        write("/resources/{name:path}", "PUT", put_resource),
        read("/nodes", get_nodes),
        read("/nodes/{name:path}", get_node),
        read("/stats", get_stats),
        read("/feeds", get_feeds),
        read("/scale", get_scale),
        write("/halt", "POST", halt),
    ]
    return table


def _next(schedule: str | None, now: float) -> dict[str, Any]:
    """A job's next occurrences after ``now`` (preview.py), and its notes."""
    if schedule is None:
        return {"occurrences": [], "notes": ["no schedule: the job is unset"]}
    try:
        shown = preview(parse_schedule(schedule), now, NEXT_SHOWN)
    except ScheduleError as exc:
        return {"occurrences": [], "notes": [str(exc)]}
    return {"occurrences": [o.as_json() for o in shown.occurrences], "notes": shown.notes}


def _totals(totals: QueueTotals) -> dict[str, Any]:
    return {"done": totals.done, "failed": totals.failed, "retried": totals.retried, "expired": totals.expired,
            "due": totals.due, "runs": totals.runs, "seconds": totals.seconds}

