"""What a job is set with, read and checked for api.py: the state a set or
unset replaces (Stored), a schedules CSV file's rows, retries, and who is
setting (for the trail), and what set_alike queued (Queued)."""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .csvfile import read_rows
from .names import whole_number
from .occurrences import count_after
from .records import RecordError, decode_job, decode_placement, encode_time
from .schedules import ScheduleError, parse_schedule

KEEP = object()  # set()'s data when none is given: the job keeps its payload
# Jobs per set.lua call of set_alike: enough that the call's own cost is
# spread thin, few enough that Redis, busy with one call, answers others
# within a few milliseconds.
SET_CHUNK = 100


@dataclass
class Queued:
    """What Redbike.queue_alike queued on a pipeline: the jobs refused before
    sending (their errors), and the ids of each set.lua call's jobs, one
    list per call, in the order queued."""

    refused: dict[str, Exception] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)

    def results(self, replies: list[Any]) -> dict[str, Any]:
        """Each sent job's result ('PLACED', ... or the error its call or its
        own values got) from the replies of the pipeline, whose first ones are
        the calls' (each a list, a result per job; or the call's error)."""
        results: dict[str, Any] = {}
        for jobids, reply in zip(self.calls, replies, strict=False):
            if isinstance(reply, Exception):
                results.update(dict.fromkeys(jobids, reply))
            else:
                results.update(zip(jobids, reply, strict=True))
        return results


class Stored(NamedTuple):
    """A job's schedule, record and pending placement as stored (None: none)."""

    schedule: str | None
    record: str | None
    pending: str | None

    @classmethod
    def of(cls, schedule: str | None, record: str | None) -> Stored:
        """What a job has, from its schedule and its value in P:jobs (which holds its pending placement)."""
        try:
            pending = decode_job(record).pending or None
        except RecordError:
            pending = None
        return cls(schedule, record, pending)

    def misfire(self, default: str) -> str:
        """Its misfire policy (``default`` for a new or unset job)."""
        try:
            return decode_job(self.record).misfire if self.schedule is not None else default
        except RecordError:
            return default

    def unrun(self, now: float, memo: dict[tuple[str, float], str] | None = None) -> tuple[str, str]:
        """The occurrence the job is placed for (the one set while it runs,
        if any), and how many of its schedule's occurrences fell due after it
        until ``now``: a set or unset that replaces it cancels them (set.lua
        and unset.lua check that it is still the job's). ``memo``: the counts
        of earlier calls with the same ``now``, by schedule and occurrence
        (the tasks of a family share both)."""
        try:
            due = decode_job(self.record).due
            if self.pending is not None:
                placed = decode_placement(self.pending)[3]
                due = float(placed) if placed else None
            if due is None or not self.schedule:
                return "", "0"
            if memo is not None and (self.schedule, due) in memo:
                return encode_time(due), memo[self.schedule, due]
            missed = str(count_after(parse_schedule(self.schedule), due, now))
        except (RecordError, ScheduleError, ValueError):
            return "", "0"
        if memo is not None:
            memo[self.schedule, due] = missed
        return encode_time(due), missed


NOTHING_STORED = Stored(None, None, None)


def read_schedules_csv(path: str) -> list[tuple[str, ...]]:
    """All (jobid, schedule, needs, misfire, retries, data) rows of a CSV
    file (the last four optional; data as JSON text), checked before any is set."""
    return [tuple(row) for _, row in read_rows(path, "JOBID,SCHEDULE,NEEDS,MISFIRE,RETRIES,DATA", optional=4)]


MAX_RETRIES = 1000


def check_retries(retries: int) -> int:
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be from 0 to {MAX_RETRIES}, not {retries}")
    return retries


def parse_retries(text: str) -> int:
    return whole_number(text, "retries", 0, MAX_RETRIES)


def who() -> str:
    """Who sets or unsets a job, for its trail: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}".replace("|", "?")
