"""Job statuses and the rules that say where a job goes next.

A job is in at most one place: the timeline (waiting for its next run), a
queue (due, waiting for a worker), or leased by a worker (running). These
functions decide the next place from the schedule; the Lua scripts apply it
atomically. They take ``now`` as an argument so that tests need no clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .records import decode_status
from .schedules import Schedule, ScheduleError, parse_schedule

# The statuses of the original redbike ...
TML = "TML"  # entered into the timeline
ENQ = "ENQ"  # entered into a work queue
BAD = "BAD"  # its schedule could not be parsed
WRK = "WRK"  # picked up by a worker
STP = "STP"  # stopped: schedule STOP, or the worker raised StopWork
DIE = "DIE"  # the worker raised an unexpected exception (error kept for tell)
# ... and the ones redbike adds:
END = "END"  # ran, and its schedule has no further run (NOW, AT, exhausted RRULE)
EXP = "EXP"  # its run's lease expired (worker died or overran its timeout); put back


@dataclass(frozen=True)
class Placement:
    """Where a job goes next: kind Q (its queue), T (the timeline at ``at``),
    S (nowhere; only ``status`` is recorded), X (schedule becomes STOP) or
    D (the job is forgotten)."""

    kind: str
    status: str
    at: float | None = None

    def script_args(self) -> list[str]:
        """The (kind, at, status) triple the Lua scripts take."""
        return [self.kind, "" if self.at is None else repr(self.at), self.status]


QUEUE = Placement("Q", ENQ)
STOPPED = Placement("X", STP)
FORGET = Placement("D", "")


def timeline_or_end(at: float | None, status: str = TML) -> Placement:
    return Placement("S", END) if at is None else Placement("T", status, at)


def place_on_set(schedule: Schedule, after: float, now: float) -> Placement:
    """Where a job goes when it is set. ``after`` is the time from which runs
    of a recurring schedule count (``--after``, else the timefile, else now):
    a run that fell due between ``after`` and ``now`` is enqueued at once, just
    once. A one-off (AT) runs once however late it is set: at its time, or at
    once if that has passed (the caller decides whether it ran already)."""
    if schedule.kind in ("NOW", "CONTINUE"):
        return QUEUE
    if schedule.kind == "STOP":
        return Placement("S", STP)
    at = schedule.first_after(-math.inf if schedule.kind == "AT" else after)
    if at is not None and at <= now:
        return QUEUE
    return timeline_or_end(at)


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as the worker reports it."""

    kind: str  # 'ok', 'stop', 'unset', 'error', 'expired'
    backoff: float | None = None  # seconds, from an integer returned by work()
    error: str = ""  # one line for tell: "ValueError: ..." or why it expired


def place_after_run(schedule_text: str, outcome: Outcome, now: float, enqueued_at: float) -> Placement:
    """Where a job goes when its run ends.

    Runs of a recurring schedule that fell due while the job waited or ran
    are coalesced into this run: the next run is the first occurrence after
    both ``now`` and the time it was enqueued (the latter guards against a
    worker clock that lags the dispatcher's).
    """
    if outcome.kind == "stop":
        return STOPPED
    if outcome.kind == "unset":
        return FORGET
    if outcome.kind == "error":
        return Placement("S", DIE)
    if outcome.kind == "expired":
        return place_after_expiry(schedule_text, now)
    try:
        schedule = parse_schedule(schedule_text)
    except ScheduleError:
        return Placement("S", BAD)
    if schedule.kind == "CONTINUE":
        if outcome.backoff:
            return Placement("T", TML, now + outcome.backoff)
        return QUEUE
    if schedule.kind in ("NOW", "AT"):
        return Placement("S", END)
    if schedule.kind == "STOP":
        return Placement("S", STP)
    return timeline_or_end(schedule.first_after(max(now, enqueued_at)))


def place_after_expiry(schedule_text: str, now: float) -> Placement:
    """Where a job goes when its run's lease expired. The run did not finish,
    so a one-off (NOW, AT) or CONTINUE job runs again; a recurring job waits
    for its next occurrence. Status EXP stays until it is enqueued again."""
    try:
        schedule = parse_schedule(schedule_text)
    except ScheduleError:
        return Placement("S", BAD)
    if schedule.kind in ("NOW", "AT", "CONTINUE"):
        return Placement("T", EXP, now)
    if schedule.kind == "STOP":
        return Placement("S", STP)
    at = schedule.first_after(now)
    return Placement("S", EXP) if at is None else Placement("T", EXP, at)


parse_status = decode_status  # "EVENT:TIMESTAMP" -> (event, timestamp); see records.py
