"""The names (and counts) users give redbike, checked where they enter.

Job ids and queue names go into Redis records whose fields are joined with
``|`` (see records.py) and into one-line outputs (CSV, logs), so neither may
hold a ``|``, a line break or any other control character, nor be empty.
Resource names have stricter rules of their own (resources.check_name).
"""

from __future__ import annotations

import math
import re

from .records import SEP

# C0 and C1 control characters (newline, NUL, escape ...) and DEL.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class BadName(ValueError):
    """A job id or queue name redbike cannot store (one line for the user)."""


def _check(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise BadName(f"bad {what} {name!r}: not a string")
    if not name.strip():
        raise BadName(f"bad {what} {name!r}: it must not be empty")
    if SEP in name or CONTROL.search(name):
        raise BadName(f"bad {what} {name!r}: no '|', line breaks or control characters")
    return name


def check_jobid(jobid: str) -> str:
    """``jobid``, if redbike can store it; else BadName."""
    return _check(jobid, "job id")


def check_queue(name: str) -> str:
    """``name`` (a queue from queue_names() or queue_for()), if redbike can
    store it; else BadName."""
    return _check(name, "queue name")


def check_feed_name(name: str) -> str:
    """``name`` (a feed's, ``--name``), if redbike can store it: a queue
    name's rules, and no ':' (it would make one feed's key another's)."""
    _check(name, "feed name")
    if ":" in name:
        raise BadName(f"bad feed name {name!r}: no ':'")
    return name


def seconds_between(text: str, what: str, low: float, high: float) -> float:
    """A number of seconds typed by a user (``--interval``, ``--every``):
    from ``low`` to ``high``; ValueError with a one-line reason otherwise."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not low <= seconds <= high:
        raise ValueError(f"{what} must be from {low:g} to {high:g} seconds, not {text!r}")
    return seconds


def whole_number(text: str, what: str, low: int, high: int, why: str = "") -> int:
    """A count typed by a user (``--count``, ``--retries``, ``--concurrency``):
    a whole number from ``low`` to ``high``; ValueError with a one-line reason
    (``why``: what bounds it) otherwise."""
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a whole number from {low} to {high}, not {text!r}") from None
    if not low <= number <= high:
        raise ValueError(f"{what} must be from {low} to {high}{why}, not {text}")
    return number
