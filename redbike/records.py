"""The records redbike stores in Redis, encoded and decoded in one place.

Lua scripts read and write some of them too (see redbike/lua/lib.lua); the
two sides must agree byte for byte.
"""

from __future__ import annotations

import json


def error_record(status: str, error: str, worker: str, now: float, trace: str = "") -> str:
    """The JSON kept in the errors hash for tell."""
    record: dict[str, object] = {"status": status, "at": now, "error": error, "worker": worker}
    if trace:
        record["traceback"] = trace
    return json.dumps(record)
