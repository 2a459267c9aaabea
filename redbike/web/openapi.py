"""The OpenAPI document of the API (/api/v1/openapi.json), made from the
routes themselves (path, method, the handler's docstring as summary), so
that it lists every endpoint; the query parameters and request bodies,
which the routes do not carry, are written here."""

from __future__ import annotations

import re
from typing import Any

from starlette.routing import BaseRoute, Route

from ..registry import redbike_version

_PAGE = {"cursor": "the next_cursor of the previous page", "limit": "at most this many (1 to 1000, default 100)"}
QUERY: dict[str, dict[str, str]] = {
    "/api/v1/jobs": {"status": "statuses, comma-separated (TML, ENQ, WRK, DIE, ...)", "queue": "the job's queue",
                     "prefix": "the job id starts with this",
                     "before": "status time before this (epoch s or ISO 8601)",
                     "after": "status time at or after this (epoch s or ISO 8601)", **_PAGE},
    "/api/v1/queues/{name}": _PAGE,
    "/api/v1/overview": {"scan": "0: leave out the counts per status and the failures (they scan every job)"},
    "/api/v1/nodes": {"level": "only the nodes of this level"},
    "/api/v1/stats": {"minutes": "how many minutes back (1 to 1440, default 60)"},
}
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/v1/jobs", "post"): {
        "type": "object", "required": ["jobid", "schedule"],
        "properties": {"jobid": {"type": "string"}, "schedule": {"type": "string"},
                       "needs": {"oneOf": [{"type": "string"}, {"type": "object"}]},
                       "misfire": {"type": "string"}, "grace": {"type": "number"}, "retries": {"type": "integer"}}},
    ("/api/v1/resources/{name}", "put"): {
        "type": "object", "required": ["capacity"],
        "properties": {"capacity": {"type": ["integer", "null"], "minimum": 0}}},
}
ERROR = {"description": "error", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"error": {"type": "string"}}}}}}


def document(routes: list[BaseRoute]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            verb = method.lower()
            operation: dict[str, Any] = {
                "summary": (route.endpoint.__doc__ or "").strip(),
                "parameters": [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                               for name in re.findall(r"\{(\w+)\}", path)],
                "responses": {"200": {"description": "JSON"}, "400": ERROR, "404": ERROR},
            }
            if verb == "get":
                operation["parameters"] += [{"name": name, "in": "query", "description": text,
                                             "schema": {"type": "string"}} for name, text in QUERY.get(path, {}).items()]
            else:
                operation["security"] = [{"bearer": []}]
                operation["responses"].update({"401": ERROR, "403": ERROR})
            if (path, verb) in BODIES:
                operation["requestBody"] = {"required": True,
                                            "content": {"application/json": {"schema": BODIES[(path, verb)]}}}
            paths.setdefault(path, {})[verb] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "redbike", "version": redbike_version(),
                 "description": "The REST API of redbike serve; writes need 'Authorization: Bearer <token>'."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
