"""Cron schedules: a 5-field expression ``minute hour day-of-month month
day-of-week`` or an alias (``@hourly`` ... ``@yearly``), optionally prefixed by
``CRON_TZ=<zone>`` or ``TZ=<zone>`` (default UTC). As in Vixie cron, when
neither day field starts with ``*`` a day matches if EITHER matches,
otherwise both must. Parsed by :func:`compile_cron`; schedules.py decides
which text is a cron expression."""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from .walltime import UTC, Invalid, earliest_wall, first_instant, zone_named

_ALIASES = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
            "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
            "@hourly": "0 * * * *"}
_MONTH_NAMES = {n.upper(): i for i, n in enumerate(calendar.month_abbr) if n}
_DAY_NAMES = {n: i for i, n in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day-of-month", 1, 31, {}),
           ("month", 1, 12, _MONTH_NAMES), ("day-of-week", 0, 7, _DAY_NAMES))
_CRON_ITEM = re.compile(r"(\*|([0-9A-Za-z]+)(?:-([0-9A-Za-z]+))?)(?:/(\d+))?")
CRON_WORD = re.compile(r"[0-9A-Za-z*,/-]+")
_LONGEST_MONTH = {m: 29 if m == 2 else calendar.monthrange(2001, m)[1] for m in range(1, 13)}
# Every accepted pattern fires within this; the sparsest is Feb 29 on one weekday,
# which can be 40 years apart (around non-leap century years).
_CRON_HORIZON_MONTHS = 50 * 12


def _cron_field(spec: str, name: str, lowest: int, highest: int, names: dict[str, int]) -> set[int]:
    def number(token: str) -> int:
        if token.upper() in names:
            return names[token.upper()]
        if not token.isdigit():
            raise Invalid(f"unknown {name} {token!r}")
        if not lowest <= int(token) <= highest:
            raise Invalid(f"{name} {token} is out of range {lowest}-{highest}")
        return int(token)

    values: set[int] = set()
    for item in spec.split(","):
        m = _CRON_ITEM.fullmatch(item)
        if not m:
            raise Invalid(f"bad {name} field {spec!r}")
        step = int(m[4] or 1)
        first = lowest if m[1] == "*" else number(m[2])
        last = highest if m[1] == "*" or (m[4] and not m[3]) else number(m[3] or m[2])
        if step == 0 or first > last:
            raise Invalid(f"bad {name} range {item!r}")
        values.update(range(first, last + 1, step))
    return values


@dataclass(frozen=True)
class Cron:
    zone: ZoneInfo
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]   # 0 = Sunday
    either_day: bool           # both day fields restricted: a day matching either one fires

    def _day_matches(self, day: date) -> bool:
        by_date, by_weekday = day.day in self.days, day.isoweekday() % 7 in self.weekdays
        return (by_date or by_weekday) if self.either_day else (by_date and by_weekday)

    def walls(self, since: datetime) -> Iterator[datetime]:
        """Matching wall times >= since, ascending; whole months and days are skipped."""
        year, month = since.year, since.month
        for _ in range(_CRON_HORIZON_MONTHS):
            if month in self.months:
                first_day = since.day if (year, month) == (since.year, since.month) else 1
                for d in range(first_day, calendar.monthrange(year, month)[1] + 1):
                    day = date(year, month, d)
                    if not self._day_matches(day):
                        continue
                    for hour in self.hours:
                        if datetime(year, month, d, hour, 59) < since:
                            continue
                        for minute in self.minutes:
                            wall = datetime(year, month, d, hour, minute)
                            if wall >= since:
                                yield wall
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            if year > 9999:
                return

    def walls_after(self, t: float) -> Iterator[datetime]:
        return self.walls(earliest_wall(t, self.zone))

    def first_after(self, t: float) -> float | None:
        return first_instant(self.walls_after(t), self.zone, t)


def compile_cron(text: str) -> Cron:
    tokens = text.split()
    zone = UTC
    if tokens[0].upper().startswith(("CRON_TZ=", "TZ=")):
        zone = zone_named(tokens.pop(0).partition("=")[2])
    if len(tokens) == 1 and tokens[0].startswith("@"):
        if tokens[0].lower() not in _ALIASES:
            raise Invalid(f"unknown cron alias {tokens[0]!r}")
        tokens = _ALIASES[tokens[0].lower()].split()
    if len(tokens) != 5:
        raise Invalid("a cron expression needs 5 fields (minute hour day-of-month month "
                       f"day-of-week), got {len(tokens)}")
    minutes, hours, days, months, weekdays = (
        _cron_field(token, *field) for token, field in zip(tokens, _FIELDS))
    either_day = not tokens[2].startswith("*") and not tokens[4].startswith("*")
    # Every month has every weekday, so only a day-of-month that no chosen month has
    # can make a pattern impossible.
    if not either_day and not any(d <= _LONGEST_MONTH[m] for m in months for d in days):
        raise Invalid("it never fires (no chosen month has that day)")
    return Cron(zone, tuple(sorted(minutes)), tuple(sorted(hours)), frozenset(days),
                 frozenset(months), frozenset(w % 7 for w in weekdays), either_day)
