"""The records redbike stores in Redis, encoded and decoded in one place.

Lua scripts read and write most of them too (see redbike/lua/lib.lua); the
two sides must agree byte for byte, which tests/test_contract.py checks on a
real server. Fields are joined with ``|``. Names (job ids, queues,
resources) never hold one (redbike.names refuses them where they enter),
and a record's one free-form field comes last or is found by counting from
both ends, so a decoder never mis-splits a record even if a foreign client
stored such a name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

SEP = "|"

# Keys.job_state(): the attribute names of the keys every script takes first,
# in the order of KEYS[1..20] in lib.lua's header.
JOB_STATE = (
    "schedules", "statuses", "timeline", "leases", "deadlines", "errors", "control",
    "dispatcher", "capacities", "usage", "parked", "ready", "parking", "parkseq", "aside", "jobs",
    "finished", "paused", "totals", "data",
)

# set.lua's needs argument: the job needs nothing (no needs, "", keeps the stored ones).
CLEAR_NEEDS = "none"


class RecordError(ValueError):
    """A stored record that cannot be decoded."""


def error_record(status: str, error: str, worker: str, now: float, trace: str = "") -> str:
    """The JSON kept in the errors hash for tell."""
    record: dict[str, object] = {"status": status, "at": now, "error": error, "worker": worker}
    if trace:
        record["traceback"] = trace
    return json.dumps(record)


# -- the status value: "EVENT:TIMESTAMP" (stamp() in lib.lua) ------------------

def encode_status(event: str, at: float) -> str:
    return f"{event}:{int(at)}"


def decode_status(value: str) -> tuple[str, float]:
    """Split "EVENT:TIMESTAMP" (a timestamp that is not a number reads as 0)."""
    event, _, stamp = value.partition(":")
    try:
        return event, float(stamp or 0)
    except ValueError:
        return event, 0.0


# -- the needs text: "resource=amount,..." (parse_needs() in lib.lua) -----------

def encode_needs(amounts: dict[str, int]) -> str:
    """Sorted ``name=amount`` pairs joined by commas ('' for none)."""
    return ",".join(f"{name}={amount}" for name, amount in sorted(amounts.items()))


def decode_needs(text: str | None) -> dict[str, int]:
    amounts: dict[str, int] = {}
    for part in filter(None, (text or "").split(",")):
        name, _, amount = part.partition("=")
        if not name or not amount.isdigit():
            raise RecordError(f"bad needs record {text!r}")
        amounts[name] = int(amount)
    return amounts


# -- alternative needs: one needs text per path to the root (replicas) ---------
# A task on a node with alternative parents (``replica_of``) may run on any
# one of its paths to the root: its job record's needs hold each path's
# needs text, in the order a claim tries them (the primary path first),
# joined by ALTERNATIVES_SEP, which no resource name holds (check_name: no
# whitespace). A text without it is plain needs: the claim of a job without
# alternatives only looks for it (paths_of() in waiting.lua).

ALTERNATIVES_SEP = " "
MAX_PATHS = 16  # paths one task may have (nodes.Forest keeps the first ones)


def encode_alternatives(paths: Iterable[dict[str, int]]) -> str:
    """Each path's needs text, in order, joined by ALTERNATIVES_SEP (a path
    given twice kept once; one path: its plain needs text). A path that
    needs nothing always has room: then the job needs nothing ('')."""
    texts = list(dict.fromkeys(encode_needs(path) for path in paths))
    return "" if "" in texts else ALTERNATIVES_SEP.join(texts)


def decode_alternatives(text: str | None) -> list[dict[str, int]]:
    """The needs of each path of a job record's needs text ([{}]: none)."""
    return [decode_needs(part) for part in (text or "").split(ALTERNATIVES_SEP)]


# -- a claim's worker-local room: "name=free/capacity,..." (claim() in lib.lua) --

def encode_local_room(free: dict[str, int], capacity: dict[str, int]) -> str:
    """What a pool has of each of its worker-local resources: free now and
    in all (sorted by name; '' for a pool that declared none)."""
    return ",".join(f"{name}={free[name]}/{capacity[name]}" for name in sorted(capacity))


def decode_local_room(text: str) -> dict[str, tuple[int, int]]:
    room: dict[str, tuple[int, int]] = {}
    for part in filter(None, text.split(",")):
        name, _, amounts = part.partition("=")
        free, _, capacity = amounts.partition("/")
        if not name or not free.isdigit() or not capacity.isdigit():
            raise RecordError(f"bad local room {text!r}")
        room[name] = int(free), int(capacity)
    return room


# -- the lease: "token|queue|worker|since|timeout|due|attempt|needs" (claim() in lib.lua)

@dataclass(frozen=True)
class LeaseRecord:
    token: str
    queue: str
    worker: str
    since: float
    timeout: float
    due: float  # the occurrence the run is for
    attempt: int  # 1 for its first run
    needs: str


def encode_lease(lease: LeaseRecord) -> str:
    return SEP.join([lease.token, lease.queue, lease.worker, encode_time(lease.since), _number(lease.timeout),
                     encode_time(lease.due), str(lease.attempt), lease.needs])


def decode_lease(value: str) -> LeaseRecord:
    """The queue is found by counting fields from both ends: the token has
    no ``|``, nor do the worker id, the times or the needs (lease_parts() in lib.lua)."""
    parts = value.split(SEP)
    if len(parts) < 8:
        raise RecordError(f"bad lease record {value!r}")
    try:
        since, timeout, due, attempt = float(parts[-5]), float(parts[-4]), float(parts[-3]), int(parts[-2])
    except ValueError:
        raise RecordError(f"bad lease record {value!r}") from None
    return LeaseRecord(parts[0], SEP.join(parts[1:-6]), parts[-6], since, timeout, due, attempt, parts[-1])


def lease_token(value: str) -> str:
    """The token of a lease record (lease_token_matches() in lib.lua)."""
    return value.partition(SEP)[0]


def _number(value: float) -> str:
    return repr(float(value))


def encode_time(value: float) -> str:
    """A time or number of seconds as redbike passes it to the scripts, which
    copy it into records and the trail: to the millisecond, with no trailing
    zeros ("1700000000", "1700000000.5")."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


# -- a placement: its 7 values joined by ",", as the scripts take it (one
# argument: placement_of() in lib.lua) and as a job record's pending field
# keeps it (set.lua, finish() in lib.lua)

PLACEMENT_VALUES = 7  # kind, at, status, due, attempt, coalesced, skipped (states.Placement)
PLACEMENT_SEP = ","  # inside the record, whose fields "|" separates


def encode_placement(values: tuple[str, ...] | list[str]) -> str:
    """A placement's 7 values (states.Placement.values)."""
    return PLACEMENT_SEP.join(values)


def decode_placement(value: str) -> list[str]:
    """The placement's 7 values; at, due and attempt may be ''."""
    parts = value.split(PLACEMENT_SEP)
    if len(parts) != PLACEMENT_VALUES:
        raise RecordError(f"bad placement {value!r}")
    return parts


# -- the job record and its trail (P:jobs; job_of() in lib.lua) ---------------

MISFIRE_POLICIES = ("once", "skip", "all")


@dataclass(frozen=True)
class JobRecord:
    """A job's occurrence, attempt, failure and misfire policy, and its
    occurrence ledger, and what it needs and has pending:
    "due|attempt|misfire|retries|fired|coalesced|skipped|cancelled|last_due|events|needs|pending".

    ``due``: the nominal time of the occurrence it is placed for, waits for
    in its queue or runs for (None: none yet). ``attempt``: that
    occurrence's run (1: the first). ``misfire``: once, all, all:N or
    skip:GRACE. Counts of occurrences ``fired`` (enqueued),
    ``coalesced`` into a later run, ``skipped`` by the misfire policy and
    ``cancelled`` (unset or set again before they fired); ``last_due``: the
    last occurrence fired. ``events``: how many events the job's trail holds
    (stored after the record in the same value: see encode_job). ``needs``:
    the resources it needs (encode_needs); ``pending``: the placement a set
    made while it ran (encode_placement; '' for none). The last three are state,
    not the ledger: records compare without them."""

    due: float | None = None
    attempt: int = 1
    misfire: str = "once"
    retries: int = 0
    fired: int = 0
    coalesced: int = 0
    skipped: int = 0
    cancelled: int = 0
    last_due: float | None = None
    events: int = field(default=0, compare=False)  # the trail's bookkeeping, not the ledger's
    needs: str = field(default="", compare=False)
    pending: str = field(default="", compare=False)


TRAIL_SEP = "\n"  # before each trail event in a job's value (an event holds none: note() in lib.lua)


def _optional_time(text: str) -> float | None:
    return float(text) if text else None


def encode_job(job: JobRecord, trail: Sequence[TrailEvent] = ()) -> str:
    """A job's value in P:jobs: its record, then its trail's events (each
    after a line break; ``events`` counts them)."""
    head = SEP.join([
        "" if job.due is None else encode_time(job.due), str(job.attempt), job.misfire, str(job.retries),
        str(job.fired), str(job.coalesced), str(job.skipped), str(job.cancelled),
        "" if job.last_due is None else encode_time(job.last_due), str(len(trail)), job.needs, job.pending])
    return head + "".join(TRAIL_SEP + encode_trail_event(event) for event in trail)


def decode_job(value: str | None) -> JobRecord:
    """A job's record (its value in P:jobs without the trail); the defaults
    for a job that has none (set before the ledger existed, or pushed by a
    foreign client)."""
    if value is None:
        return JobRecord()
    head = value.partition(TRAIL_SEP)[0]
    parts = head.split(SEP)
    if len(parts) != 12:
        raise RecordError(f"bad job record {head!r}")
    try:
        return JobRecord(_optional_time(parts[0]), int(parts[1]), parts[2], int(parts[3]), int(parts[4]),
                         int(parts[5]), int(parts[6]), int(parts[7]), _optional_time(parts[8]), int(parts[9]),
                         parts[10], parts[11])
    except ValueError:
        raise RecordError(f"bad job record {head!r}") from None


def trail_of(value: str | None) -> list[str]:
    """The encoded events of a job's trail (its value in P:jobs after the
    record), oldest first; decode each with decode_trail_event."""
    if not value:
        return []
    return value.split(TRAIL_SEP)[1:]


def occurrence_of(record: str, now: float) -> tuple[float, int]:
    """The due time and attempt at the head of a job record, as the claim
    leases them (a record without a due time: ``now``), without decoding
    the rest: every claimed job's path reads them."""
    due, _, rest = record.partition(SEP)
    attempt = rest.partition(SEP)[0]
    try:
        return (float(due) if due else now), int(attempt)
    except ValueError:
        raise RecordError(f"bad job record {record!r}") from None


def check_misfire(text: str) -> str:
    """``once``, ``all``, ``all:N`` (N >= 1) or ``skip:GRACE`` (seconds >= 0),
    as is_misfire() in lib.lua; ValueError with a one-line reason otherwise."""
    name, _, parameter = text.partition(":")
    if text in ("once", "all") or (name == "all" and parameter.isdigit() and int(parameter) >= 1) \
            or (name == "skip" and parameter.isdigit()):
        return text
    raise ValueError(f"bad misfire policy {text!r} (once, skip, all or all:N)")


# -- the finished list: "time|jobid" (finished() in lib.lua, retire.lua) -------

def encode_finished(at: float, jobid: str) -> str:
    """An entry of the list of jobs that ended for good (the time as the trail writes it)."""
    return f"{encode_time(at)}{SEP}{jobid}"


def decode_finished(value: str) -> tuple[float, str]:
    at, sep, jobid = value.partition(SEP)
    try:
        if sep:
            return float(at), jobid
    except ValueError:
        pass
    raise RecordError(f"bad finished entry {value!r}")


# -- a trail event: "time|event|field|..." (note() in lib.lua) ----------------

# Each event's fields, in order; the last may hold '|' (a schedule, an error).
TRAIL_FIELDS: dict[str, tuple[str, ...]] = {
    "set": ("by", "status", "needs", "misfire", "retries", "schedule"),
    "retry": ("by",),
    "unset": ("by",),
    "cancelled": ("due", "count"),
    "enqueued": ("due", "attempt"),
    "misfire": ("policy", "coalesced", "skipped", "due"),
    "parked": ("resource", "in_use", "capacity"),
    "aside": ("resource", "amount", "capacity"),
    "woken": ("resource",),
    "run": ("due", "attempt", "token", "worker", "since", "status", "next_at", "error"),
}


@dataclass(frozen=True)
class TrailEvent:
    at: float
    event: str
    fields: dict[str, str]


def encode_trail_event(event: TrailEvent) -> str:
    names = TRAIL_FIELDS[event.event]
    return SEP.join([encode_time(event.at), event.event, *(event.fields.get(name, "") for name in names)])


def decode_trail_event(value: str) -> TrailEvent:
    at, _, rest = value.partition(SEP)
    event, _, rest = rest.partition(SEP)
    names = TRAIL_FIELDS.get(event)
    if names is None:
        raise RecordError(f"bad trail event {value!r}")
    parts = rest.split(SEP, len(names) - 1)
    try:
        when = float(at)
    except ValueError:
        raise RecordError(f"bad trail event {value!r}") from None
    if len(parts) != len(names):
        raise RecordError(f"bad trail event {value!r}")
    return TrailEvent(when, event, dict(zip(names, parts)))


# -- a job's payload (P:data) ---------------------------------------------------

DROP_DATA = "null"  # set.lua's payload argument that drops the job's payload (JSON null: no payload)
KEEP_DATA = ""  # set.lua's payload argument that keeps the job's
DEFAULT_MAX_DATA_BYTES = 64 * 1024


class DataError(ValueError):
    """A payload that is not JSON, or too large."""


def encode_data(value: Any, max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> str:
    """A payload -> its stored text: compact JSON (JSON only: never pickle),
    at most ``max_bytes`` bytes in UTF-8; None is no payload (DROP_DATA)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"the job's data must be JSON: {exc}") from None
    size = len(text.encode())
    if size > max_bytes:
        raise DataError(f"the job's data is {size} bytes of JSON, more than max-data-bytes ({max_bytes})")
    return text


def parse_data(text: str, max_bytes: int = DEFAULT_MAX_DATA_BYTES) -> str:
    """A payload typed as JSON text (--data, a CSV column) -> its stored text."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DataError(f"the job's data is not JSON: {exc}") from None
    return encode_data(value, max_bytes)


def decode_data(text: str) -> Any:
    """A stored payload -> its value ('' : None, no payload)."""
    return json.loads(text) if text else None


# -- a slot's tally of runs that ended (finish.lua and tally.lua: add_tally) ----

def encode_tally(counts: Mapping[str, int]) -> str:
    """Increments of fields of the totals (stats.py) -> one "field|count" line each."""
    return "\n".join(f"{field}|{count}" for field, count in counts.items() if count > 0)


# -- the replies of claim.lua and finish.lua ----------------------------------

class Claimed(NamedTuple):  # a NamedTuple: made on every job's path, and quicker to make than a dataclass
    """{'JOB', jobid, index, schedule, job record, needs, payload}:
    ``queue_index`` is the 0-based position of the job's queue among the
    queues the claim tried; ``record`` its job record, as stored (decode_job:
    the run's occurrence and attempt, its policy; decoded only where needed);
    ``data`` its payload as stored (decode_data; '' if it has none)."""

    jobid: str
    queue_index: int
    schedule: str
    record: str
    needs: dict[str, int]
    data: str = ""


@dataclass(frozen=True)
class Halt:
    """{'HALT', control}: the control key holds a value the worker has not seen."""

    control: str


NONE = "NONE"  # nothing to claim
MORE = "MORE"  # the claim parked many jobs: call again

ClaimReply = Claimed | Halt | str


def decode_claim(reply: list[object]) -> ClaimReply:
    kind = reply[0]
    if kind == "JOB":
        _, jobid, index, schedule, record, needs, data = reply
        # Most jobs need nothing: their needs are '' (or nil), read without a call.
        return Claimed(str(jobid), int(str(index)), str(schedule), str(record),
                       decode_needs(str(needs)) if needs else {}, str(data))
    if kind == "HALT":
        return Halt(str(reply[1]))
    if kind in (NONE, MORE):
        return str(kind)
    raise RecordError(f"bad claim reply {reply!r}")


FINISHES = ("DONE", "GONE", "STALE")  # finish() in lib.lua


def decode_finish(reply: list[object]) -> tuple[str, ClaimReply]:
    """finish.lua's reply: how the run ended, then the claim's reply, in one
    flat array (Redis 6.2 writes a nested one in two system calls)."""
    done = reply[0] if reply else None
    if done not in FINISHES or len(reply) < 2:
        raise RecordError(f"bad finish reply {reply!r}")
    return str(done), decode_claim(reply[1:])
