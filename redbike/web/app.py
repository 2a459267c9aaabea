"""The Starlette app of ``redbike serve``: the API under /api/v1/ (api.py),
/metrics (metrics.py) and the web UI (ui.py), over one WebContext.

Handlers are plain functions: Starlette runs them in its thread pool, so the
(blocking, thread-safe) redis-py client serves them as it serves the CLI.
Errors of the API and /metrics are JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..api import Redbike
from ..overviews import parts_of
from ..sharded import ShardedRedbike
from . import metrics, ui
from .api import routes as api_routes
from .security import ApiError, host_of

log = logging.getLogger(__name__)


@dataclass
class WebContext:
    """What every handler reads and writes through: the installation's job
    spaces (``parts``: the Redbike itself, or a Redbike per shard, read and
    merged by overviews.py), the Redbike or ShardedRedbike (its worker routes
    jobs to queues, its writes go to each job's shard), the write token
    (None: read-only) and the clock (Redis'); ``hosts``: the only ``Host``
    names answered (None: any; serve gives the loopback names when it
    listens on loopback)."""

    parts: list[Redbike]
    bike: Redbike | ShardedRedbike
    token: str | None
    clock: Callable[[], float]
    hosts: frozenset[str] | None = None

    @classmethod
    def of(cls, bike: Redbike | ShardedRedbike, token: str | None, hosts: frozenset[str] | None = None) -> WebContext:
        return cls(parts_of(bike), bike, token or None, bike.clock, hosts)

    @property
    def sharded(self) -> bool:
        return len(self.parts) > 1


def error(request: Request, status: int, message: str) -> Response:
    """JSON for the API and /metrics, text for the UI's pages."""
    if request.url.path.startswith(("/api/", "/metrics")):
        return JSONResponse({"error": message}, status_code=status)
    return PlainTextResponse(message, status_code=status)


def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = error(request, exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


def _api(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    response = error(request, exc.status, exc.message)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _redis(request: Request, exc: Exception) -> Response:
    # One line, without the address: a Redis error may name the server, never its password.
    log.warning("Redis error on %s %s: %s", request.method, request.url.path, exc)
    return error(request, 503, f"Redis error: {type(exc).__name__}")


class KnownHosts:
    """Answers 400 to a request whose Host header is not one of ``hosts``."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = host_of(Headers(scope=scope).get("host", ""))
            if host not in self.hosts:
                response = JSONResponse({"error": f"unknown Host {host!r}: this server answers "
                                                  f"{', '.join(sorted(self.hosts))}"}, status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(context: WebContext) -> Starlette:
    middleware = [] if context.hosts is None else [Middleware(KnownHosts, hosts=context.hosts)]
    return Starlette(
        routes=[*api_routes(context), *metrics.routes(context), *ui.routes(context)],
        middleware=middleware,
        exception_handlers={HTTPException: _http, ApiError: _api, redis.RedisError: _redis},
    )
