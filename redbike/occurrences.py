"""Which occurrences of a schedule run: the misfire policy, and retries.

When an occurrence fires late (the dispatchers were down, the job waited in
its queue or ran past its next occurrence), the occurrences that fell due
meanwhile are *missed*. The job's misfire policy says what becomes of each:

- ``once`` (the default): they are coalesced into one run. Fired late by the
  dispatcher, the job runs once for the latest of them; those that fell due
  while it waited in its queue or ran are coalesced into that run.
- ``skip:GRACE``: those more than GRACE seconds late are skipped; those
  within it are coalesced into one run, now; with none within it the job
  waits for its next occurrence (a one-off that is too late ends as SKP).
- ``all`` / ``all:N``: each runs, oldest first; with N, only the N latest
  (the older ones are skipped).

Every occurrence thus ends in exactly one ledger state: fired, coalesced,
skipped or cancelled. Missed occurrences are counted one by one, up to
MAX_COUNTED; beyond that (a per-second schedule after days of downtime) the
rest are coalesced or skipped uncounted, and the trail says so.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .records import check_misfire
from .schedules import Schedule

MAX_COUNTED = 100_000

DEFAULT_BACKOFF = 10.0  # retry-backoff: seconds before the first retry, at most
DEFAULT_BACKOFF_MAX = 3600.0  # retry-backoff-max


@dataclass(frozen=True)
class Misfire:
    """A misfire policy (records.check_misfire spells the text)."""

    name: str  # once, skip, all
    grace: float = 0.0  # skip: seconds late an occurrence may still run
    most: int | None = None  # all:N

    @classmethod
    def parse(cls, text: str) -> Misfire:
        name, _, parameter = check_misfire(text).partition(":")
        if name == "skip":
            return cls(name, grace=float(parameter))
        return cls(name, most=int(parameter) if parameter else None)


def misfire_text(policy: str, grace: float | None) -> str:
    """The stored policy for ``--misfire=POLICY [--grace=SECONDS]``: skip
    takes its grace (default 0) into the text, as ``skip:GRACE``."""
    name, _, parameter = policy.partition(":")
    if name == "skip" and not parameter:
        return check_misfire(f"skip:{int(grace or 0)}")
    if grace is not None and name != "skip":
        raise ValueError(f"--grace applies to the skip policy only, not {policy!r}")
    return check_misfire(policy)


def count_after(schedule: Schedule, due: float, now: float) -> int:
    """How many occurrences of a recurring ``schedule`` fell due after ``due``
    up to ``now`` (at most MAX_COUNTED); 0 for other schedules."""
    first = schedule.first_after(due) if schedule.kind in ("RRULE", "CRON") else None
    if first is None or first > now:
        return 0
    return len(_missed(schedule, first, now)[0])


@dataclass(frozen=True)
class Firing:
    """What to do with a late occurrence: fire ``due`` (None: none is left
    to fire; the job waits for ``next_due``, None if the schedule has no
    more), after coalescing ``coalesced`` and skipping ``skipped`` others.
    ``fires``: how many of the occurrences due by now it fires, now or in
    the runs that follow (``all`` fires them one by one): if the placement
    gives way (the job is unset or set again while its run ends), the run's
    finish counts them cancelled."""

    due: float | None
    next_due: float | None
    coalesced: int
    skipped: int
    fires: int = 0


def _missed(schedule: Schedule, first: float, now: float) -> tuple[list[float], float | None, int]:
    """The occurrences from ``first`` (an occurrence) up to ``now``, the first
    one after ``now``, and how many more fell due uncounted."""
    found = [first]
    upcoming = schedule.first_after(first)
    while upcoming is not None and upcoming <= now and len(found) < MAX_COUNTED:
        found.append(upcoming)
        upcoming = schedule.first_after(upcoming)
    uncounted = 0
    if upcoming is not None and upcoming <= now:  # too many to count one by one
        upcoming = schedule.first_after(now)
        uncounted = 1
    return found, upcoming, uncounted


def fire_late(schedule: Schedule, first: float, now: float, policy: Misfire, *, ran: bool = False) -> Firing:
    """Apply ``policy`` to occurrence ``first`` (at or before ``now``) and
    those after it up to ``now``. ``ran``: they fell due while the job's
    previous occurrence waited or ran (under ``once`` they are coalesced into
    that run, and none fires now)."""
    due: list[float]
    if schedule.kind in ("RRULE", "CRON"):
        due, upcoming, uncounted = _missed(schedule, first, now)
    else:  # a one-off (AT)
        due, upcoming, uncounted = [first], None, 0
    if policy.name == "once":
        if ran:
            return Firing(None, upcoming, len(due) + uncounted, 0)
        return Firing(due[-1], upcoming, len(due) - 1 + uncounted, 0, 1)
    if policy.name == "skip":
        stale = [t for t in due if now - t > policy.grace]
        fresh = due[len(stale):]
        if not fresh:
            return Firing(None, upcoming, 0, len(stale) + uncounted)
        return Firing(fresh[-1], upcoming, len(fresh) - 1 + uncounted, len(stale), 1)
    kept = due if policy.most is None else due[-policy.most:]
    return Firing(kept[0], upcoming, 0, len(due) - len(kept) + uncounted, len(kept))


# A run that did not complete (its worker died, it overran its timeout) runs
# again at least this many times, whatever ``retries`` says: a worker
# restarted by a deploy must not fail the jobs it held. A job that always
# overruns still ends, as DIE.
EXPIRY_RETRIES = 2


@dataclass(frozen=True)
class Retry:
    """retry-backoff and retry-backoff-max; ``jitter`` draws the random
    fraction of full jitter (tests pass a constant)."""

    backoff: float = DEFAULT_BACKOFF
    backoff_max: float = DEFAULT_BACKOFF_MAX
    jitter: Callable[[], float] = field(default=random.random, compare=False)

    def delay(self, attempt: int) -> float:
        """Seconds before the run after failed ``attempt`` (1 for the first):
        exponential backoff with full jitter, at most backoff_max."""
        ceiling = min(self.backoff_max, self.backoff * 2.0 ** min(attempt - 1, 64))
        return ceiling * self.jitter()

    @staticmethod
    def limit(retries: int, outcome: str) -> int:
        """Attempts after the first for a run that raised (``error``) or did not complete."""
        return retries if outcome == "error" else max(retries, EXPIRY_RETRIES)


DEFAULT_RETRY = Retry()
