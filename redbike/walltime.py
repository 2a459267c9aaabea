"""Wall times in a zone and the instants they fire at, shared by the
schedule kinds (schedules.py, cron.py): a wall time is read with ``fold=0``,
so one in a spring-forward gap fires shifted by the gap, and one that occurs
twice fires at its first occurrence (see schedules.py)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

UTC = ZoneInfo("UTC")


class Invalid(Exception):
    """Why part of a schedule is bad; parse_schedule prefixes the whole schedule text."""


def zone_named(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (LookupError, ValueError, OSError):  # not found, malformed key, a directory...
        raise Invalid(f"unknown time zone {name!r}") from None


def earliest_wall(t: float, zone: ZoneInfo) -> datetime:
    """The earliest wall time whose instant (fold=0) can be later than t.

    Usually the wall time at t. But up to a gap's length after a spring-forward
    transition, wall times inside the gap map (fold=0) to instants after t although
    they read earlier than the clock at t; reading t with the offset of a day before
    covers that, as gaps last at most a day.
    """
    now = datetime.fromtimestamp(t, zone)
    naive = now.replace(tzinfo=None)
    offset = now.utcoffset() or timedelta()  # aware in a ZoneInfo: never None
    earlier_offset = datetime.fromtimestamp(t - 86400, zone).utcoffset() or timedelta()
    return min(naive, naive - offset + earlier_offset)


def first_instant(walls: Iterable[datetime], zone: ZoneInfo, t: float) -> float | None:
    """Smallest instant later than t among ascending wall times (from earliest_wall on)."""
    best = None
    for wall in walls:
        instant = wall.replace(tzinfo=zone).timestamp()
        if instant <= t:
            continue
        if best is None or instant < best:
            best = instant
        if datetime.fromtimestamp(instant, zone).replace(tzinfo=None) == wall:
            # This wall time really exists. Later existing wall times map to later
            # instants, and later gap times map past their transition, which is after
            # this instant, so nothing further can beat best.
            break
    return best
