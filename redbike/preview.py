"""`redbike preview`: the next occurrences of a schedule, in its zone and in UTC.

Occurrences are what :meth:`Schedule.first_after` returns, one after another, so
the preview shows exactly the instants a job would be placed at. Each is marked
where the zone's clock changes what the schedule seems to say: a wall time inside
a spring-forward gap runs shifted forward by the gap, and a wall time that occurs
twice at a fall-back fold runs at its first occurrence only (see
:mod:`redbike.schedules`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .names import whole_number
from .schedules import Schedule
from .walltime import UTC

DEFAULT_COUNT = 10
MAX_COUNT = 1000

# Control words have no occurrences: what they do instead.
_CONTROL = {
    "NOW": "NOW: runs once, right away; no occurrences to preview",
    "CONTINUE": "CONTINUE: runs again as soon as each run ends; no occurrences to preview",
    "STOP": "STOP: never runs (the job stays registered with status STP)",
}


def parse_count(text: str) -> int:
    """--count: a whole number from 1 to MAX_COUNT; ValueError with a one-line reason."""
    return whole_number(text, "--count", 1, MAX_COUNT)


@dataclass(frozen=True)
class Mark:
    kind: str   # 'dst-shifted', 'fold' or 'past'
    note: str   # the sentence a person reads


@dataclass(frozen=True)
class Occurrence:
    due: float          # epoch seconds
    zone: ZoneInfo
    marks: tuple[Mark, ...]

    @property
    def local(self) -> datetime:
        return datetime.fromtimestamp(self.due, self.zone)

    @property
    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.due, UTC)

    def line(self) -> str:
        local, utc = self.local, self.utc
        columns = [f"{local:%Y-%m-%d %H:%M:%S} {local.tzname()} ({_offset(local)})",
                   f"{utc:%Y-%m-%d %H:%M:%S} UTC", *(mark.note for mark in self.marks)]
        return "  ".join(columns)

    def as_json(self) -> dict[str, Any]:
        return {
            "due": int(self.due) if self.due.is_integer() else self.due,
            "local": self.local.isoformat(),
            "zone": self.zone.key,
            "abbreviation": self.local.tzname(),
            "utc": self.utc.isoformat().replace("+00:00", "Z"),
            "marks": [{"kind": mark.kind, "note": mark.note} for mark in self.marks],
        }


@dataclass(frozen=True)
class Preview:
    schedule: Schedule
    after: float
    occurrences: list[Occurrence]
    notes: list[str]    # no occurrences and why, fewer than asked, what a rule counts from

    def lines(self) -> Iterator[str]:
        """The schedule and its zone, a line per occurrence, then the notes; a control
        word: just what it does."""
        if self.occurrences or self.schedule.kind not in _CONTROL:
            yield f"{self.schedule.text}  (zone {self.schedule.zone.key})"
        for occurrence in self.occurrences:
            yield occurrence.line()
        yield from self.notes

    def json(self) -> str:
        return json.dumps([occurrence.as_json() for occurrence in self.occurrences], indent=2)


def _offset(moment: datetime) -> str:
    text = moment.strftime("%z")  # +0530
    return f"{text[:3]}:{text[3:5]}"


def _clock(wall: datetime, day: datetime) -> str:
    """A wall time as hours and minutes (and seconds if any), with its date if not on ``day``'s."""
    shown = f"{wall:%H:%M:%S}" if wall.second else f"{wall:%H:%M}"
    return shown if wall.date() == day.date() else f"{wall:%Y-%m-%d} {shown}"


def _marks(schedule: Schedule, due: float) -> tuple[Mark, ...]:
    """What the zone's clock changes did to the occurrence at ``due``."""
    zone = schedule.zone
    local = datetime.fromtimestamp(due, zone)
    wall = local.replace(tzinfo=None)
    marks = []
    # A gap is only where the offset grew within the day before (gaps last at most
    # a day), so most occurrences need no look at the schedule's wall times.
    offset = local.utcoffset() or timedelta()  # aware in a ZoneInfo: never None
    if (datetime.fromtimestamp(due - 86400, zone).utcoffset() or timedelta()) < offset:
        walls = schedule.walls_at(due)
        for shifted in (w for w in walls if w != wall):
            also = f", with the {_clock(wall, local)} run" if wall in walls else ""
            marks.append(Mark("dst-shifted", f"DST-shifted ({_clock(shifted, local)} does not exist "
                                             f"on that day; runs at {_clock(wall, local)}{also})"))
    second = wall.replace(tzinfo=zone, fold=1)
    if second.utcoffset() != offset and local.fold == 0:
        marks.append(Mark("fold", f"fold: {_clock(wall, local)} occurs twice, runs at the first "
                                  f"({local.tzname()}) only, not at {_clock(wall, local)} {second.tzname()}"))
    return tuple(marks)


def preview(schedule: Schedule, after: float, count: int = DEFAULT_COUNT) -> Preview:
    """The next ``count`` occurrences of ``schedule`` after ``after`` (fewer when it ends)."""
    if schedule.kind in _CONTROL:
        return Preview(schedule, after, [], [_CONTROL[schedule.kind]])
    if schedule.kind == "AT":
        # An instant, not a wall time: no DST marks. One that has passed still runs
        # once, at once, when set.
        when = schedule.first_after(-math.inf)
        assert when is not None  # an AT schedule always has its time
        past = () if when > after else (Mark("past", "past: a one-off runs once, however late"),)
        return Preview(schedule, after, [Occurrence(when, UTC, past)], [])
    notes = []
    if schedule.kind == "RRULE" and "DTSTART" not in schedule.text.upper():
        notes.append("an RRULE without DTSTART counts from when the job is set or last ran; "
                     f"shown counting from {datetime.fromtimestamp(after, UTC):%Y-%m-%d %H:%M:%S} UTC")
    occurrences: list[Occurrence] = []
    t = after
    while len(occurrences) < count:
        due = schedule.first_after(t)
        if due is None:
            notes.append("no more occurrences: the rule ends (COUNT or UNTIL)" if occurrences else
                         "no occurrences after that time: the rule has ended (COUNT or UNTIL)")
            break
        occurrences.append(Occurrence(due, schedule.zone, _marks(schedule, due)))
        t = due
    return Preview(schedule, after, occurrences, notes)
