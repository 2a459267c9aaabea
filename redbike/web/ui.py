"""The web UI: server-rendered pages (Jinja2, autoescaped: job ids, errors
and worker names are user data) on the read model (overview.py, views.py,
Redbike.tell/explain, stats.py). Nothing is built at install time and
nothing comes from elsewhere at run time: the templates, one stylesheet and
one small script (static/ui.js) ship in the package.

Pages only read. Their buttons call the REST API's write endpoints
(/api/v1/..., app.py) from the browser with fetch() and the token the user
typed into the page header (kept in sessionStorage), so the UI adds no
write path of its own: the API's token and Origin checks guard it. A
Content-Security-Policy allows scripts and styles from this server only, so
an id that slipped through escaping still could not run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .. import info, overviews, states
from ..api import Redbike
from ..explain import ago, span, utc
from ..names import BadName
from ..sharded import ShardedRedbike
from . import charts, listing, views
from .security import ApiError

HERE = Path(__file__).resolve().parent
REFRESH_SECONDS = 5  # the live pages reload their content this often
PAGE_SIZE = 50  # jobs per page of the jobs list
CHART_MINUTES = 60  # the charts show the last hour, a bar a minute
CHART_REFRESH_SECONDS = 30
LIVE_STATUSES = (states.ENQ, states.WRK, states.RTY, states.EXP)  # a job page refreshes while its job has one
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


class Context(Protocol):
    """What the pages need of app.WebContext."""

    @property
    def parts(self) -> list[Redbike]: ...
    @property
    def bike(self) -> Redbike | ShardedRedbike: ...
    @property
    def token(self) -> str | None: ...
    @property
    def clock(self) -> Callable[[], float]: ...


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(utc=utc, span=span, iso=_iso, path=_path)
    env.globals.update(ago=ago, api=api_path, page_url=page_url)
    return env


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _path(text: str) -> str:
    """A job id, queue or resource name as one URL path segment (``/``, ``?``, ``#`` and ``%`` encoded)."""
    return quote(text, safe="")


def api_path(*parts: str) -> str:
    """An API endpoint's path: /api/v1/ and the parts, each encoded."""
    return "/api/v1/" + "/".join(_path(part) for part in parts)


def page_url(path: str, **query: str) -> str:
    """A page's URL with the query parameters that are not empty."""
    given = {k: v for k, v in query.items() if v}
    return path + ("?" + urlencode(given) if given else "")


class Pages:
    """The UI's request handlers; each reads what its page shows, renders it."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.env = _environment()
        self.overviews = views.Overviews(REFRESH_SECONDS)

    def render(self, request: Request, template: str, status_code: int = 200, **values: Any) -> Response:
        """``template`` with ``values``, the path, whether writes are possible, ``now`` (default:
        the clock's) and ``refresh`` (seconds between the page's reloads; 0: none)."""
        now = values.pop("now", None)
        page = self.env.get_template(template).render(
            request_path=request.url.path, writable=self.context.token is not None,
            now=self.context.clock() if now is None else now, refresh=values.pop("refresh", 0), **values)
        return HTMLResponse(page, status_code=status_code, headers={
            "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "same-origin", "Cache-Control": "no-store"})

    def overview(self, request: Request) -> Response:
        shown = self.overviews.read(self.context.bike)
        return self.render(request, "overview.html", now=shown["at"], refresh=REFRESH_SECONDS, shown=shown,
                           redis_line=info.redis_line(shown), status_line=info.status_line(shown),
                           busy=sum(1 for w in shown["workers"] for s in w.get("running", []) if s.get("jobid")),
                           slots=sum(int(w.get("slots") or 0) for w in shown["workers"]))

    def queues(self, request: Request) -> Response:
        shown = self.context.bike.overview(scan=False)
        return self.render(request, "queues.html", now=shown["at"], refresh=REFRESH_SECONDS, shown=shown)

    def queue(self, request: Request) -> Response:
        name = request.path_params["name"]
        cursor = request.query_params.get("cursor", "")
        shown = self.context.bike.overview(scan=False)
        found = [q for q in shown["queues"] if q["queue"] == name]
        if not found:
            return self.failed(request, 404, f"no such queue: {name} (no pool works it, and it holds no job)")
        try:
            page = listing.waiting_over(self.context.parts, name, cursor or None, PAGE_SIZE)
        except ApiError as exc:
            return self.failed(request, exc.status, exc.message)
        following = page["next_cursor"]
        here = f"/queues/{_path(name)}"
        return self.render(request, "queue.html", now=shown["at"], refresh=REFRESH_SECONDS, name=name,
                           shown={**shown, "queues": found}, page=page,
                           offset=page["offset"] if "offset" in page else int(cursor or 0),
                           next_url=page_url(here, cursor=following) if following else "",
                           first_url=here if cursor else "")

    def workers(self, request: Request) -> Response:
        shown = self.context.bike.overview(scan=False)
        return self.render(request, "workers.html", now=shown["at"], refresh=REFRESH_SECONDS, shown=shown)

    def resources(self, request: Request) -> Response:
        return self.render(request, "resources.html", refresh=REFRESH_SECONDS,
                           resources=views.resources(self.context.parts))

    def charts(self, request: Request) -> Response:
        context = self.context
        queue = request.query_params.get("queue", "")
        now = context.clock()
        minutes = overviews.per_minute(context.parts, now, CHART_MINUTES)
        names = sorted({name for _, per_queue in minutes for name in per_queue} | ({queue} if queue else set()))
        return self.render(request, "charts.html", now=now, refresh=CHART_REFRESH_SECONDS, queue=queue,
                           queues=names, charts=charts.charts(minutes, queue), minutes=len(minutes))

    def jobs(self, request: Request) -> Response:
        query = request.query_params
        filters = {name: query.get(name, "").strip() for name in ("status", "queue", "prefix")}
        cursor = query.get("cursor", "")
        if filters["status"] and filters["status"] not in listing.STATUSES:
            return self.failed(request, 400, f"status: one of {', '.join(listing.STATUSES)}")
        wanted = listing.JobFilter(frozenset([filters["status"]]) if filters["status"] else None,
                                   filters["queue"] or None, filters["prefix"] or None)
        bike = self.context.bike
        try:
            page = listing.jobs_over(self.context.parts, wanted, bike.worker.queue_for, cursor or None, PAGE_SIZE)
        except ApiError as exc:  # a cursor this server did not answer
            return self.failed(request, exc.status, exc.message)
        jobs = sorted(page["jobs"], key=lambda job: job["jobid"])
        views.next_runs(self.context.parts, jobs)
        following = page["next_cursor"]
        return self.render(request, "jobs.html", jobs=jobs, filters=filters, statuses=listing.STATUSES,
                           next_url=page_url("/jobs", cursor=following, **filters) if following else "",
                           first_url=page_url("/jobs", **filters) if cursor else "")

    def job(self, request: Request) -> Response:
        jobid = request.path_params["jobid"]
        bike = self.context.bike
        try:
            explained = bike.explain(jobid)
        except BadName as exc:
            return self.failed(request, 400, f"not a job id: {exc}")
        if explained is None:
            return self.render(request, "job.html", status_code=404, jobid=jobid, told=None, explained=None)
        told = explained.state or {}
        now = explained.now
        live = REFRESH_SECONDS if told.get("event") in LIVE_STATUSES else 0
        return self.render(request, "job.html", now=now, refresh=live, jobid=jobid, told=told, explained=explained,
                           timeline=explained.timeline(), queue=views.queue_of(bike, jobid),
                           upcoming=views.occurrences(told.get("schedule"), now))

    def failed(self, request: Request, status_code: int, message: str) -> Response:
        return self.render(request, "error.html", status_code=status_code, message=message)


def routes(context: Context) -> list[BaseRoute]:
    """The UI's pages, at / (app.create_app mounts them beside the API)."""
    pages = Pages(context)
    return [
        Route("/", pages.overview, name="overview"),
        Route("/queues", pages.queues, name="queues"),
        Route("/queues/{name:path}", pages.queue, name="queue"),
        Route("/jobs", pages.jobs, name="jobs"),
        Route("/jobs/{jobid:path}", pages.job, name="job"),
        Route("/workers", pages.workers, name="workers"),
        Route("/resources", pages.resources, name="resources"),
        Route("/charts", pages.charts, name="charts"),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

