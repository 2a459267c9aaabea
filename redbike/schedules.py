"""Parse job schedules and compute when they next fire.

A schedule is one of:

* ``NOW``, ``CONTINUE``, ``STOP``: control words without occurrences; the
  dispatcher handles them itself.
* ``AT:<time>``: once, at epoch seconds or an ISO-8601 time (naive means UTC).
* An iCalendar RRULE, optionally preceded by a DTSTART, e.g.
  ``DTSTART;TZID=Europe/Berlin:20260101T023000`` + ``RRULE:FREQ=DAILY``. The two
  parts may be separated by a newline, a space or the two characters ``\\n``, so
  that a schedule fits on a command line or in a CSV cell. DTSTART without TZID
  (or ending in Z) is UTC. A rule *without* DTSTART is anchored at the ``t``
  given to :meth:`Schedule.first_after`, truncated to whole seconds, in UTC:
  ``FREQ=MINUTELY;INTERVAL=10`` means "10 minutes after t". Time parts that the
  anchor would supply are zero instead when a coarser time part is given, so
  ``FREQ=DAILY;BYHOUR=3`` fires at 03:00:00, not at 03:MM:SS of t. Such a rule
  cannot have a COUNT (there is no fixed start to count from).
* A 5-field cron expression ``minute hour day-of-month month day-of-week`` or an
  alias (``@hourly`` ... ``@yearly``), optionally prefixed by ``CRON_TZ=<zone>``
  or ``TZ=<zone>``; default UTC. As in Vixie cron, when neither day field starts
  with ``*`` a day matches if EITHER matches, otherwise both must.

Occurrences are wall-clock times in the schedule's zone, converted to instants
with ``fold=0``: a wall time inside a spring-forward gap fires once, shifted
forward by the gap (Berlin 2026-03-29 02:30 -> 03:30 CEST), and a wall time that
occurs twice fires once, at its first occurrence. The shift can map two wall
times onto one instant, or a later wall time onto an earlier instant, so
:meth:`Schedule.first_after` reasons in instants: it returns the smallest one
strictly after ``t``, and iterating ``t = first_after(t)`` never repeats or goes
back.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from itertools import takewhile
from zoneinfo import ZoneInfo

from dateutil.parser import isoparse
from dateutil.rrule import rrulestr

from .cron import CRON_WORD, Cron, compile_cron
from .walltime import UTC, Invalid, earliest_wall, first_instant, zone_named


class ScheduleError(ValueError):
    """A schedule or timestamp that cannot be used; the message is one line for a user."""


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


_EPOCH = re.compile(r"\d+(?:\.\d+)?")
# Timestamps are bounded to what datetime can turn into a wall time in any zone
# (up to year 9999, with a margin for the zone's offset and a day's look back).
EARLIEST = 0.0
LATEST = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def timestamp_problem(when: float) -> str | None:
    """Why ``when`` cannot be used as a time (not finite, before 1970, after 9999), or None."""
    if not math.isfinite(when):
        return f"{when} is not a time"
    if not EARLIEST <= when <= LATEST:
        return f"{when:.0f} is outside the years 1970 to 9999"
    return None


def _timestamp(text: str) -> float:
    s = text.strip()
    if _EPOCH.fullmatch(s):
        when = float(s)
    else:
        try:  # not datetime.fromisoformat: before Python 3.11 it refuses 'Z' and '.5'
            parsed = isoparse(s)
            when = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError):
            raise Invalid("expected epoch seconds or an ISO-8601 time like "
                           f"2026-11-22T10:00:00Z, got {text.strip()!r}") from None
    problem = timestamp_problem(when)
    if problem:
        raise Invalid(f"{s[:40]}{'...' if len(s) > 40 else ''}: {problem}")
    return when


def parse_timestamp(text: str) -> float:
    """Epoch seconds from '1700000000', '1700000000.5', or ISO-8601 ('2026-11-22T10:00:00Z',
    '2026-11-22T10:00:00+01:00'; a naive ISO time means UTC). Raises ScheduleError."""
    try:
        return _timestamp(text)
    except Invalid as e:
        raise ScheduleError(f"bad timestamp: {e}") from None


@dataclass(frozen=True)
class _At:
    when: float

    def first_after(self, t: float) -> float | None:
        return self.when if self.when > t else None


_FREQS = ("YEARLY", "MONTHLY", "WEEKLY", "DAILY", "HOURLY", "MINUTELY", "SECONDLY")
# Integer rule parts: lowest and highest magnitude, and whether negative values
# (counting from the end of the period) are allowed.
_INT_PARTS = {
    "INTERVAL": (1, None, False), "COUNT": (1, None, False),
    "BYSECOND": (0, 59, False), "BYMINUTE": (0, 59, False), "BYHOUR": (0, 23, False),
    "BYMONTH": (1, 12, False), "BYMONTHDAY": (1, 31, True), "BYYEARDAY": (1, 366, True),
    "BYWEEKNO": (1, 53, True), "BYSETPOS": (1, 366, True),
}
_WEEKDAY = "(?:MO|TU|WE|TH|FR|SA|SU)"
_NTH_WEEKDAY = rf"(?:[+-]?\d{{1,2}})?{_WEEKDAY}"
_NAMED_PARTS = {"FREQ": None, "UNTIL": None, "WKST": re.compile(_WEEKDAY),
                "BYDAY": re.compile(rf"{_NTH_WEEKDAY}(?:,{_NTH_WEEKDAY})*")}
# The FREQ each BYxxx part selects; at or above FREQ it filters periods out.
_BY_UNIT = {"BYMONTH": 1, "BYWEEKNO": 2, "BYYEARDAY": 3, "BYMONTHDAY": 3, "BYDAY": 3,
            "BYHOUR": 4, "BYMINUTE": 5, "BYSECOND": 6}
_ICAL_TIME = re.compile(r"(\d{4})-?(\d\d)-?(\d\d)(?:T(\d\d):?(\d\d):?(\d\d)(Z)?)?", re.IGNORECASE)
_PER_DAY = {"HOURLY": 24, "MINUTELY": 1440, "SECONDLY": 86400}
_STEPS = {"WEEKLY": timedelta(weeks=1), "DAILY": timedelta(days=1), "HOURLY": timedelta(hours=1),
          "MINUTELY": timedelta(minutes=1), "SECONDLY": timedelta(seconds=1)}
# A probe for occurrences from here runs into dateutil's year-9999 limit within a
# century, so even a rule that never fires is given up on in bounded time (< 1 s).
# A rule firing less than once a century might be called "never fires": no job is.
_PROBE = datetime(9899, 1, 1)


def _ical_time(value: str, what: str) -> tuple[datetime, bool, bool]:
    """(naive datetime, ends in Z, is a bare date) from 20260101T000000Z-style text."""
    m = _ICAL_TIME.fullmatch(value)
    if m:
        try:
            year, month, day, hour, minute, second = (int(x or 0) for x in m.groups()[:6])
            return datetime(year, month, day, hour, minute, second), bool(m[7]), m[4] is None
        except ValueError:  # month 13 and the like
            pass
    raise Invalid(f"bad {what} {value!r} (expected e.g. 20260101T093000 or 20260101T093000Z)")


def _check_part(key: str, value: str) -> None:
    if key in _NAMED_PARTS:
        pattern = _NAMED_PARTS[key]
        if pattern and not pattern.fullmatch(value.upper()):
            raise Invalid(f"bad {key} {value!r}")
        return
    lowest, highest, signed = _INT_PARTS[key]
    for item in value.split(",") if key.startswith("BY") else [value]:
        if not re.fullmatch(r"[+-]?\d+" if signed else r"\d+", item):
            raise Invalid(f"{key} needs whole numbers, got {value!r}")
        if abs(int(item)) < lowest or (highest is not None and abs(int(item)) > highest):
            bound = f"at least {lowest}" if highest is None else f"{lowest}..{highest}"
            raise Invalid(f"{key} {item} is out of range ({'+/-' if signed else ''}{bound})")


def _advance(start: datetime, since: datetime, freq: str, interval: int) -> datetime:
    """A DTSTART no later than `since` giving the same occurrences as `start` from there on.

    dateutil iterates from DTSTART on every query: for a minutely rule started a year
    ago that is half a million steps. Moving DTSTART by whole INTERVAL periods keeps
    the period grid and everything dateutil derives from DTSTART (time of day, weekday,
    day of month, month), so later occurrences are unchanged. COUNT is not in the rule
    dateutil sees (_RRule.last stands for it), so it does not count from the new start.
    """
    if since <= start:
        return start
    if freq in _STEPS:
        period = _STEPS[freq] * interval
        return start + period * ((since - start) // period)
    months = interval * (12 if freq == "YEARLY" else 1)
    for k in range(((since.year - start.year) * 12 + since.month - start.month) // months, 0, -1):
        month = start.month - 1 + k * months
        try:
            moved = start.replace(year=start.year + month // 12, month=month % 12 + 1)
        except ValueError:  # no day 29-31 in that month (or past year 9999): a period earlier
            continue
        if moved <= since:
            return moved
    return start


@dataclass(frozen=True)
class _RRule:
    line: str                 # the RRULE for dateutil, without COUNT and UNTIL
    zone: ZoneInfo
    start: datetime | None    # DTSTART as naive wall time; None: anchored at t
    freq: str
    interval: int
    last: datetime | None     # the wall time of the last occurrence COUNT allows
    until: float | None       # UNTIL as an instant, compared with instants

    def walls(self, anchor: datetime, since: datetime) -> Iterator[datetime]:
        try:
            for wall in rrulestr(self.line, dtstart=anchor).xafter(since, inc=True):
                if self.last is not None and wall > self.last:
                    return
                yield wall
        except ValueError:  # dateutil's way to say INTERVAL and BYxxx leave no (more) occurrences
            return

    def walls_after(self, t: float) -> Iterator[datetime]:
        """Ascending wall times from the earliest whose instant can be later than t."""
        if self.start is None:
            anchor = datetime.fromtimestamp(math.floor(t), UTC).replace(tzinfo=None)
            return self.walls(anchor, anchor)
        since = earliest_wall(t, self.zone)
        return self.walls(_advance(self.start, since, self.freq, self.interval), since)

    def first_after(self, t: float) -> float | None:
        best = first_instant(self.walls_after(t), self.zone, t)
        return None if best is None or (self.until is not None and best > self.until) else best


# COUNT is turned into its last occurrence once, so that no query enumerates from
# DTSTART: by arithmetic for a rule of fixed steps, else by enumerating up to this
# many occurrences (about 0.1 s).
_COUNT_ENUMERATED = 10_000
# One period of a rule stays within a century, well inside dateutil's year 9999.
_MAX_INTERVAL = {"YEARLY": 100, "MONTHLY": 1200, "WEEKLY": 5200, "DAILY": 36500,
                 "HOURLY": 876_000, "MINUTELY": 52_560_000, "SECONDLY": 3_153_600_000}


def _last_occurrence(line: str, start: datetime, freq: str, interval: int, count: int,
                     fixed: bool) -> datetime | None:
    """The wall time of occurrence number COUNT (None: it would fall after year 9999).
    ``fixed``: the rule has no BYxxx part, so occurrences are whole periods apart."""
    steps = (count - 1) * interval
    try:
        if fixed and freq in _STEPS:
            return start + _STEPS[freq] * steps
        if fixed and start.day <= 28:  # MONTHLY or YEARLY, on a day every month has
            month = start.month - 1 + steps * (12 if freq == "YEARLY" else 1)
            return start.replace(year=start.year + month // 12, month=month % 12 + 1)
    except (OverflowError, ValueError):  # past year 9999
        return None
    if count > _COUNT_ENUMERATED:
        raise Invalid(f"COUNT={count} is too large for this rule (at most "
                       f"{_COUNT_ENUMERATED} with BYxxx parts or a DTSTART day after the 28th)")
    last = None
    try:
        for last in rrulestr(f"{line};COUNT={count}", dtstart=start):
            pass
    except ValueError:  # no (more) occurrences
        pass
    if last is None:
        raise Invalid("it never fires")
    return last


def _dtstart(part: str) -> tuple[ZoneInfo, datetime]:
    m = re.fullmatch(r"DTSTART((?:;[^:;]*)*):(.*)", part, re.IGNORECASE)
    if not m:
        raise Invalid(f"bad DTSTART {part!r}")
    zone = UTC
    for param in filter(None, m[1].split(";")):
        name, _, value = param.partition("=")
        if name.upper() == "TZID":
            zone = zone_named(value.strip('"'))
        elif param.upper() not in ("VALUE=DATE", "VALUE=DATE-TIME"):
            raise Invalid(f"unsupported DTSTART parameter {param!r}")
    start, utc, _ = _ical_time(m[2], "DTSTART")
    if utc and zone is not UTC:
        raise Invalid("DTSTART has both a TZID and a Z (UTC) suffix")
    return zone, start


def _rule_parts(body: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in filter(None, body.split(";")):
        key, eq, value = item.partition("=")
        key = key.upper()
        if not eq or not value:
            raise Invalid(f"expected NAME=VALUE, got {item!r}")
        if key not in _INT_PARTS and key not in _NAMED_PARTS:
            raise Invalid(f"unknown rule part {key!r}")
        if key in pairs:
            raise Invalid(f"{key} given twice")
        _check_part(key, value)
        pairs[key] = value
    return pairs


def _compile_rrule(text: str) -> _RRule:
    parts = [p for p in re.split(r"\s+|\\n", text) if p]
    starts = [p for p in parts if p.upper().startswith("DTSTART")]
    rules = [p for p in parts if not p.upper().startswith("DTSTART")]
    if len(starts) > 1 or len(rules) != 1:
        raise Invalid("expected one RRULE, optionally preceded by one DTSTART")
    zone, start = _dtstart(starts[0]) if starts else (UTC, None)
    pairs = _rule_parts(rules[0][6:] if rules[0].upper().startswith("RRULE:") else rules[0])
    freq = pairs.get("FREQ", "").upper()
    if freq not in _FREQS:
        raise Invalid(f"unknown FREQ {pairs['FREQ']!r}" if "FREQ" in pairs else "missing FREQ")
    if "BYSETPOS" in pairs and freq in _PER_DAY:
        # Within an hour, minute or second every period holds the same set of times, so
        # BYSETPOS adds nothing there; and an impossible one makes dateutil step through
        # every period until year 9999, which can take hours.
        raise Invalid("BYSETPOS needs FREQ=DAILY or coarser")
    if "COUNT" in pairs and "UNTIL" in pairs:
        raise Invalid("COUNT and UNTIL cannot be combined")  # RFC 5545; dateutil would warn
    if start is None and "COUNT" in pairs:
        raise Invalid("COUNT needs a DTSTART to count from")
    interval, rank = int(pairs.get("INTERVAL", 1)), _FREQS.index(freq)
    if interval > _MAX_INTERVAL[freq]:
        raise Invalid(f"INTERVAL={interval} is too long for FREQ={freq} (at most "
                       f"{_MAX_INTERVAL[freq]}: one period must stay within a century)")
    filters = [k for k in pairs if rank >= _BY_UNIT.get(k, len(_FREQS))]
    if start is None and interval > 1 and filters:
        # Which periods INTERVAL skips would depend on when the rule is asked, and for
        # some anchors none would match (FREQ=DAILY;INTERVAL=7;BYDAY=MO on a Tuesday).
        raise Invalid(f"INTERVAL with {filters[0]} needs a DTSTART to count intervals from")
    clock = [k for k in filters if k in ("BYHOUR", "BYMINUTE", "BYSECOND")]
    if clock and freq in _PER_DAY and _PER_DAY[freq] % interval:
        # Then each day's grid differs and dateutil may crawl through centuries of
        # seconds looking for a day where the grid meets the clock filter.
        raise Invalid(f"INTERVAL={interval} does not divide a day, so it cannot go with "
                       f"{clock[0]}")
    until = None
    if "UNTIL" in pairs:
        end, utc, bare_date = _ical_time(pairs["UNTIL"], "UNTIL")
        end += timedelta(days=1, seconds=-1) if bare_date else timedelta()  # the whole day
        until = end.replace(tzinfo=UTC if utc else zone).timestamp()
    for finer, coarser in (("BYMINUTE", {"BYHOUR"}), ("BYSECOND", {"BYHOUR", "BYMINUTE"})):
        # dateutil takes time parts finer than FREQ from DTSTART; from an anchor at t
        # that would be t's minute or second, while BYHOUR=3 means 03:00:00.
        if (start is None and finer not in pairs and coarser & pairs.keys()
                and _BY_UNIT[finer] > rank):
            pairs[finer] = "0"
    line = ";".join(f"{k}={v}" for k, v in pairs.items() if k not in ("COUNT", "UNTIL"))
    rule = _RRule(line=line, zone=zone, start=start, freq=freq, interval=interval, last=None,
                  until=until)
    since = max(start or _PROBE, _PROBE)
    anchor = _advance(start, since, freq, interval) if start else since
    try:
        probe = next(rule.walls(anchor, since), None)
    except (TypeError, LookupError, ArithmeticError) as e:  # dateutil's odd ways to object
        raise Invalid(f"invalid rule: {_one_line(e)}") from None
    if probe is None:
        raise Invalid("it never fires")
    if start is not None and "COUNT" in pairs:
        fixed = not any(k.startswith("BY") for k in pairs)
        rule = dataclasses.replace(
            rule, last=_last_occurrence(line, start, freq, interval, int(pairs["COUNT"]), fixed))
    if start is not None and until is not None:
        first = rule.first_after(start.replace(tzinfo=zone).timestamp() - 86400)
        if first is None:
            raise Invalid("it never fires (UNTIL is before the first occurrence)")
    return rule


@lru_cache(maxsize=4096)  # workers ask about the same few schedule strings constantly
def _compile(text: str) -> tuple[str, _At | _RRule | Cron | None]:
    upper = text.upper()
    if upper in ("NOW", "CONTINUE", "STOP"):
        return upper, None
    if upper.startswith("AT:"):
        return "AT", _At(_timestamp(text[3:]))
    words = text.split()
    if text.startswith("@") or upper.startswith(("CRON_TZ=", "TZ=")) or (
            len(words) > 1 and all(CRON_WORD.fullmatch(w) for w in words)
            and re.search(r"[\d*]", text)):
        return "CRON", compile_cron(text)
    if re.match(r"(DTSTART|RRULE:|\w+=)", upper):
        return "RRULE", _compile_rrule(text)
    raise Invalid("expected NOW, CONTINUE, STOP, AT:<time>, an RRULE (FREQ=...) "
                   "or a cron expression (m h dom mon dow)")


def _compiled(text: str) -> tuple[str, _At | _RRule | Cron | None]:
    try:
        return _compile(text)
    except Invalid as e:
        raise ScheduleError(f"bad schedule {text!r}: {_one_line(e)}") from None


@dataclass(frozen=True)
class Schedule:
    text: str   # the schedule exactly as the user gave it (stripped)
    kind: str   # one of 'NOW', 'AT', 'CONTINUE', 'STOP', 'RRULE', 'CRON'

    def first_after(self, t: float) -> float | None:
        """Epoch seconds of the first occurrence strictly later than t, or None if there is none.

        AT: its timestamp if > t else None. RRULE/CRON: the next occurrence > t (None once
        COUNT/UNTIL exhaust it). NOW/CONTINUE/STOP: ValueError; callers handle those kinds.
        """
        rule = _compiled(self.text)[1]
        if rule is None:
            raise ValueError(f"{self.kind} schedules have no occurrences")
        return rule.first_after(t)

    @property
    def zone(self) -> ZoneInfo:
        """The zone of the schedule's wall times: UTC unless a TZID or CRON_TZ names one."""
        rule = _compiled(self.text)[1]
        return rule.zone if isinstance(rule, (_RRule, Cron)) else UTC

    def walls_at(self, instant: float) -> list[datetime]:
        """The wall times (naive, in :attr:`zone`) that fire at ``instant``, an occurrence
        first_after returned: the one that exists there, one inside a spring-forward gap
        shifted onto it, or both. AT and rules without DTSTART: the UTC time."""
        rule = _compiled(self.text)[1]
        if rule is None:
            raise ValueError(f"{self.kind} schedules have no occurrences")
        local = datetime.fromtimestamp(instant, self.zone).replace(tzinfo=None)
        if isinstance(rule, _At) or (isinstance(rule, _RRule) and rule.start is None):
            return [local]
        # A wall time firing at instant is at most the wall time there (a gap time
        # reads earlier than where it lands), and not before earliest_wall.
        walls = takewhile(lambda wall: wall <= local, rule.walls_after(instant - 1))
        return [wall for wall in walls if wall.replace(tzinfo=rule.zone).timestamp() == instant]


def parse_schedule(text: str) -> Schedule:
    """Validate a schedule fully, so a bad one is never stored; raises ScheduleError."""
    stripped = text.strip()
    return Schedule(stripped, _compiled(stripped)[0])
