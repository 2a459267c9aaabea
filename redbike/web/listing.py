"""Pages of jobs and of a queue's waiting jobs, for the API: never a full
scan in one request.

Jobs are listed as P:statuses is scanned (HSCAN with COUNT and, for a
prefix of the job id, MATCH): one request makes at most MAX_SCANS calls,
so it examines a few thousand jobs whatever the filters, and answers the
matches it found with ``next_cursor``, an opaque token to pass back for the
next page (None: the scan is done). A page may hold fewer jobs than
``limit``, even none, while a cursor follows: a filter that few jobs pass
is answered a stretch of the hash at a time.

The cursor holds HSCAN's cursor and the last job id answered from that
batch (a batch can hold more matches than ``limit``: the next page goes on
after that id). As with SCAN itself, a job present during the whole listing
is answered at least once; one set or unset meanwhile may be answered twice
or not at all.

Over shards (``jobs_over``, ``waiting_over``) the shards are listed one
after the other, each job with its ``shard``; the cursor also holds the
shard the listing is on.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from .. import states
from ..api import Redbike
from ..keys import Keys
from ..records import decode_status
from .security import ApiError

STATUSES = (states.TML, states.ENQ, states.WRK, states.BAD, states.STP, states.DIE, states.END, states.EXP,
            states.RTY, states.SKP)
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_SCANS = 10  # HSCAN calls one request makes at most
MIN_COUNT = 100  # HSCAN's COUNT: the page's limit, within these bounds
MAX_COUNT = 1000


def _glob(text: str) -> str:
    """``text`` with Redis' glob characters escaped, for a MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def encode_cursor(scan: int, last: str | None) -> str:
    return base64.urlsafe_b64encode(json.dumps([scan, last]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[int, str | None]:
    if not cursor:
        return 0, None
    try:
        scan, last = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(scan, int) and scan >= 0 and (last is None or isinstance(last, str)):
            return scan, last
    except (ValueError, TypeError, binascii.Error):
        pass
    raise ApiError(400, f"bad cursor {cursor!r}: pass back a next_cursor this server answered")


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a listing answers: statuses, queue, prefix of the job id,
    status time before (strictly) / at or after (epoch s). None: any."""

    statuses: frozenset[str] | None = None
    queue: str | None = None
    prefix: str | None = None
    before: float | None = None
    after: float | None = None

    def status_matches(self, event: str, since: float) -> bool:
        return ((self.statuses is None or event in self.statuses)
                and (self.before is None or since < self.before)
                and (self.after is None or since >= self.after))


def _queue(queue_for: Callable[[str], str], jobid: str) -> str | None:
    try:
        return queue_for(jobid)
    except Exception:  # noqa: BLE001 - a worker's routing may refuse a job id it never made: no queue
        return None


def jobs_page(client: redis.Redis, keys: Keys, wanted: JobFilter, queue_for: Callable[[str], str],
              cursor: str | None, limit: int) -> dict[str, Any]:
    """Up to ``limit`` jobs passing ``wanted`` from ``cursor`` on: {"jobs":
    [{jobid, status, since, queue, schedule}], "next_cursor"}."""
    scan, last = decode_cursor(cursor)
    match = _glob(wanted.prefix) + "*" if wanted.prefix else None
    count = min(max(limit, MIN_COUNT), MAX_COUNT)
    found: list[dict[str, Any]] = []
    following: str | None = None
    for _ in range(MAX_SCANS):
        after_batch, batch = cast("tuple[int, dict[str, str]]",
                                  client.hscan(keys.statuses, scan, match=match, count=count))
        items = list(batch.items())
        start = 0
        if last is not None:  # go on after the last job answered from this batch (not found: from its start)
            start = next((i + 1 for i, (jobid, _) in enumerate(items) if jobid == last), 0)
            last = None
        for index in range(start, len(items)):
            jobid, value = items[index]
            event, since = decode_status(value)
            if not wanted.status_matches(event, since):
                continue
            queue = _queue(queue_for, jobid)
            if wanted.queue is not None and queue != wanted.queue:
                continue
            found.append({"jobid": jobid, "status": event, "since": since, "queue": queue})
            if len(found) == limit and index < len(items) - 1:
                following = encode_cursor(scan, jobid)
                break
        else:
            scan = after_batch
            following = None if scan == 0 else encode_cursor(scan, None)
        if following is None or len(found) >= limit:
            break
    if found:
        schedules = client.hmget(keys.schedules, [job["jobid"] for job in found])
        for job, schedule in zip(found, cast("list[str | None]", schedules), strict=True):
            job["schedule"] = schedule
    return {"jobs": found, "next_cursor": following}


def waiting_page(client: redis.Redis, keys: Keys, queue: str, cursor: str | None, limit: int) -> dict[str, Any]:
    """A queue's waiting jobs, oldest first (the order claims take them):
    {"jobs": [{jobid, since}], "length", "next_cursor"}. The cursor
    counts from the oldest, so a page read while claims take jobs may skip
    some: it is a look at a moving line."""
    if cursor is None:
        offset = 0
    elif cursor.isdigit():
        offset = int(cursor)
    else:
        raise ApiError(400, f"bad cursor {cursor!r}: pass back a next_cursor this server answered")
    key = keys.queue(queue)
    with client.pipeline(transaction=False) as pipe:
        pipe.llen(key)
        pipe.lrange(key, -(offset + limit), -(offset + 1))  # LPUSH in, RPOP out: the oldest is last
        length, jobids = pipe.execute()
    jobids = list(reversed(jobids))
    stamps = cast("list[str | None]", client.hmget(keys.statuses, jobids)) if jobids else []
    waiting = [{"jobid": jobid, "since": decode_status(stamp)[1] if stamp else None}
               for jobid, stamp in zip(jobids, stamps, strict=True)]
    more = offset + limit < length
    return {"jobs": waiting, "length": length, "next_cursor": str(offset + limit) if more else None}


def _bad_cursor(cursor: str) -> ApiError:
    return ApiError(400, f"bad cursor {cursor!r}: pass back a next_cursor this server answered")


def jobs_over(parts: Sequence[Redbike], wanted: JobFilter, queue_for: Callable[[str], str], cursor: str | None,
              limit: int) -> dict[str, Any]:
    """jobs_page over every part (shard), one after the other: a request
    goes on to the next shard while its page is not full and the shard's
    scan is done. The cursor: the shard, and its own cursor."""
    if len(parts) == 1:
        return jobs_page(parts[0].client, parts[0].keys, wanted, queue_for, cursor, limit)
    shard, inner = decode_cursor(cursor)  # the same shape: a whole number and a text or None
    if shard >= len(parts):
        raise _bad_cursor(cursor or "")
    found: list[dict[str, Any]] = []
    while True:
        part = parts[shard]
        page = jobs_page(part.client, part.keys, wanted, queue_for, inner, limit - len(found))
        found += [dict(job, shard=shard) for job in page["jobs"]]
        inner = page["next_cursor"]
        if inner is None:
            shard += 1
        if inner is not None or shard == len(parts) or len(found) >= limit:
            break
    return {"jobs": found, "next_cursor": None if shard == len(parts) else encode_cursor(shard, inner)}


def waiting_over(parts: Sequence[Redbike], queue: str, cursor: str | None, limit: int) -> dict[str, Any]:
    """waiting_page over every part (shard), one after the other (each
    shard's line oldest first), each job with its ``shard``; ``length``
    summed, ``offset`` the place of the page's first job in the lines. The
    cursor: ``SHARD.OFFSET``."""
    if len(parts) == 1:
        return waiting_page(parts[0].client, parts[0].keys, queue, cursor, limit)
    found = re.fullmatch(r"(\d+)\.(\d+)", cursor or "0.0")
    if found is None or int(found[1]) >= len(parts):
        raise _bad_cursor(cursor or "")
    shard, offset = int(found[1]), int(found[2])
    jobs: list[dict[str, Any]] = []
    length, before, following = 0, 0, None
    for index, part in enumerate(parts):
        if index < shard or len(jobs) >= limit or following is not None:
            counted = int(part.client.llen(part.keys.queue(queue)))
            length += counted
            before += counted if index < shard else 0
            if following is None and index > shard and len(jobs) >= limit:
                following = f"{index}.0"
            continue
        page = waiting_page(part.client, part.keys, queue, str(offset), limit - len(jobs))
        length += page["length"]
        jobs += [dict(job, shard=index) for job in page["jobs"]]
        offset = 0  # the next shard's line from its start
        if page["next_cursor"] is not None:
            following = f"{index}.{page['next_cursor']}"
    return {"jobs": jobs, "length": length, "next_cursor": following, "offset": before + int(found[2])}
