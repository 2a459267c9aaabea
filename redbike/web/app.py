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
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..api import Redbike
from ..keys import Keys
from . import metrics, ui
from .api import routes as api_routes
from .security import ApiError

log = logging.getLogger(__name__)


@dataclass
class WebContext:
    """What every handler reads and writes through: the Redis client and
    keys, the Redbike (its worker routes jobs to queues), the write token
    (None: read-only) and the clock (Redis')."""

    client: redis.Redis
    keys: Keys
    bike: Redbike
    token: str | None
    clock: Callable[[], float]

    @classmethod
    def of(cls, bike: Redbike, token: str | None) -> WebContext:
        return cls(bike.client, bike.keys, bike, token or None, bike.clock)


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


def create_app(context: WebContext) -> Starlette:
    return Starlette(
        routes=[*api_routes(context), *metrics.routes(context), *ui.routes(context)],
        exception_handlers={HTTPException: _http, ApiError: _api, redis.RedisError: _redis},
    )
