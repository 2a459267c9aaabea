"""Job statuses and the rules that say where a job goes next.

A job is in at most one place: the timeline (waiting for its next run), a
queue (due, waiting for a worker), or leased by a worker (running). These
functions decide the next place from the schedule, the occurrence it was
for and the job's misfire and retry policy (redbike.occurrences); the Lua
scripts apply it atomically. They take ``now`` as an argument so that tests
need no clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .occurrences import DEFAULT_RETRY, Firing, Misfire, Retry, fire_late
from .records import JobRecord, decode_status, encode_placement, encode_time
from .schedules import Schedule, ScheduleError, parse_schedule

# The statuses of the original redbike ...
TML = "TML"  # entered into the timeline
ENQ = "ENQ"  # entered into a work queue
BAD = "BAD"  # its schedule could not be parsed
WRK = "WRK"  # picked up by a worker
STP = "STP"  # stopped: schedule STOP, or the worker raised StopWork
DIE = "DIE"  # the worker raised an unexpected exception (error kept for tell), retries used up
# ... and the ones redbike adds:
END = "END"  # ran, and its schedule has no further run (NOW, AT, exhausted RRULE)
EXP = "EXP"  # its run's lease expired (worker died or overran its timeout); put back
RTY = "RTY"  # its run raised; it runs again after a backoff (retries left)
SKP = "SKP"  # a one-off skipped by its misfire policy (too late); it will not run


@dataclass(frozen=True)
class Placement:
    """Where a job goes next: kind Q (its queue), T (the timeline at ``at``),
    S (nowhere; only ``status`` is recorded), X (schedule becomes STOP) or
    D (the job is forgotten); ``due`` (the occurrence it is placed for) and
    ``attempt`` (None: the job record's stay), and the ledger counts of
    occurrences ``coalesced`` and ``skipped`` on the way. ``fires``: the
    occurrences already due it fires (occurrences.Firing.fires), which a
    run's finish counts cancelled if the placement gives way; not one of its
    7 values (the finish takes it apart), nor compared."""

    kind: str
    status: str
    at: float | None = None
    due: float | None = None
    attempt: int | None = None
    coalesced: int = 0
    skipped: int = 0
    fires: int = field(default=0, compare=False)

    @functools.cached_property
    def values(self) -> tuple[str, ...]:
        return (self.kind, _time(self.at), self.status, _time(self.due),
                "" if self.attempt is None else str(self.attempt), str(self.coalesced), str(self.skipped))

    @functools.cached_property
    def script_arg(self) -> str:
        """The placement as the Lua scripts take it, one argument
        (records.encode_placement; placement_of() in lib.lua): made once per
        placement, so a constant one (most runs' ENDED) costs a finish nothing."""
        return encode_placement(self.values)


def _time(value: float | None) -> str:
    return "" if value is None else encode_time(value)


QUEUE = Placement("Q", ENQ)
STOPPED = Placement("X", STP)
FORGET = Placement("D", "")
ENDED = Placement("S", END)
DIED = Placement("S", DIE)
STOPPED_BY_SCHEDULE = Placement("S", STP)


def _fired(firing: Firing, status: str = TML) -> Placement:
    """A late occurrence fired (or, none left to fire, the next one waited for)."""
    counts = {"coalesced": firing.coalesced, "skipped": firing.skipped, "fires": firing.fires}
    if firing.due is not None:
        return Placement("Q", ENQ, due=firing.due, attempt=1, **counts)
    if firing.next_due is None:
        return Placement("S", END, **counts)
    return Placement("T", status, firing.next_due, due=firing.next_due, attempt=1, **counts)


def place_on_set(schedule: Schedule, after: float, now: float, misfire: str = "once") -> Placement:
    """Where a job goes when it is set. ``after`` is the time from which runs
    of a recurring schedule count (``--after``, else the timefile, else now):
    the occurrences that fell due between ``after`` and ``now`` are missed,
    and the misfire policy says which run (``once``: one run, now). A one-off
    (AT) runs once however late it is set (unless ``skip`` finds it too
    late): at its time, or at once if that has passed."""
    if schedule.kind in ("NOW", "CONTINUE"):
        return Placement("Q", ENQ, due=now, attempt=1)
    if schedule.kind == "STOP":
        return Placement("S", STP)
    first = schedule.first_after(-math.inf if schedule.kind == "AT" else after)
    if first is None:
        return Placement("S", END)
    if first > now:
        return Placement("T", TML, first, due=first, attempt=1)
    placement = _fired(fire_late(schedule, first, now, Misfire.parse(misfire)))
    if schedule.kind == "AT" and placement.kind == "S":
        return Placement("S", SKP, skipped=placement.skipped)
    return placement


def fire_due(schedule_text: str | None, job: JobRecord, score: float, now: float) -> Placement:
    """Where the dispatcher puts a job whose timeline score fell due: its
    queue, for the occurrence its record holds. A recurring occurrence fired
    late (a second or more: no schedule repeats faster) goes through its
    misfire policy. A retry keeps its occurrence and attempt."""
    if now - score < 1 or job.attempt > 1 or schedule_text is None:
        return QUEUE
    if schedule_text.startswith("AT:") and not job.misfire.startswith("skip"):
        return QUEUE  # a one-off runs once however late, unless skip finds it too late
    try:
        schedule = parse_schedule(schedule_text)
    except ScheduleError:
        return Placement("S", BAD)
    first = job.due if job.due is not None else score
    if schedule.kind not in ("RRULE", "CRON", "AT"):
        return QUEUE
    placement = _fired(fire_late(schedule, first, now, Misfire.parse(job.misfire)))
    if schedule.kind == "AT" and placement.kind == "S":
        return Placement("S", SKP, skipped=placement.skipped)
    return placement


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as the worker reports it."""

    kind: str  # 'ok', 'stop', 'unset', 'error', 'expired'
    backoff: float | None = None  # seconds, from an integer returned by work()
    error: str = ""  # one line for tell: "ValueError: ..." or why it expired


OK = Outcome("ok")  # most runs' outcome, made once: an Outcome is frozen, so one object serves every run


def place_after_run(schedule_text: str, outcome: Outcome, now: float,
                    record: JobRecord | Callable[[], JobRecord], retry: Retry = DEFAULT_RETRY) -> Placement:
    """Where a job goes when its run (for occurrence ``job.due``, attempt
    ``job.attempt`` of its ``record``) ends. ``record`` may be a function
    that gives it: a one-off that ran well never needs it, so a worker need
    not decode it on most jobs' paths.

    A run that raised, or did not complete (expired), runs again after a
    backoff while it has retries left (``job.retries`` more runs than the
    first; at least EXPIRY_RETRIES for one that did not complete); then it
    ends as DIE (a recurring job that did not complete waits for its next
    occurrence, status EXP). The occurrences of a
    recurring schedule that fell due while the job waited or ran are missed:
    the misfire policy says which run (``once``: none; they are coalesced
    into this run).
    """
    if outcome.kind == "stop":
        return STOPPED
    if outcome.kind == "unset":
        return FORGET
    if outcome.kind == "ok" and schedule_text in ("NOW", "STOP"):  # most jobs: no parse, no record
        return ENDED if schedule_text == "NOW" else STOPPED_BY_SCHEDULE
    job = record if isinstance(record, JobRecord) else record()
    if outcome.kind in ("error", "expired") and job.attempt <= retry.limit(job.retries, outcome.kind):
        status = RTY if outcome.kind == "error" else EXP
        return Placement("T", status, now + retry.delay(job.attempt), attempt=job.attempt + 1)
    if outcome.kind == "error":
        return DIED
    try:
        schedule = parse_schedule(schedule_text)
    except ScheduleError:
        return Placement("S", BAD)
    if outcome.kind == "expired":
        return _after_expiry(schedule, now, job)
    if schedule.kind == "CONTINUE":
        if outcome.backoff:
            return Placement("T", TML, now + outcome.backoff, due=now + outcome.backoff, attempt=1)
        return Placement("Q", ENQ, due=now, attempt=1)
    if schedule.kind in ("NOW", "AT"):
        return ENDED
    if schedule.kind == "STOP":
        return STOPPED_BY_SCHEDULE
    return _next_occurrence(schedule, now, job, TML)


def _next_occurrence(schedule: Schedule, now: float, job: JobRecord, status: str) -> Placement:
    """The occurrence after the one the run was for (``job.due``); those
    that fell due meanwhile go through the misfire policy."""
    upcoming = schedule.first_after(job.due if job.due is not None else now)
    if upcoming is None:
        return Placement("S", END if status == TML else status)
    if upcoming > now:
        return Placement("T", status, upcoming, due=upcoming, attempt=1)
    return _fired(fire_late(schedule, upcoming, now, Misfire.parse(job.misfire), ran=True), status)


def _after_expiry(schedule: Schedule, now: float, job: JobRecord) -> Placement:
    """A run that did not complete and has no retries left: a one-off (NOW,
    AT) or CONTINUE job dies; a recurring job waits for its next occurrence,
    status EXP."""
    if schedule.kind in ("NOW", "AT", "CONTINUE"):
        return Placement("S", DIE)
    if schedule.kind == "STOP":
        return Placement("S", STP)
    return _next_occurrence(schedule, now, job, EXP)


parse_status = decode_status  # "EVENT:TIMESTAMP" -> (event, timestamp); see records.py
