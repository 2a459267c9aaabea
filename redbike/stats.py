"""Counters of what the queues did: jobs that became due, runs that ended
done, failed, retried or expired, their run time and a histogram of their
durations.

The scripts keep them in one hash, ``P:totals`` (lib.lua's ``enqueue`` and
``count_run``), as they move the jobs: nobody scans jobs to count, and the
worker's round trip stays one. The totals only grow (Prometheus counters are
made of them). What happened in a window of time, and per minute for the
charts, comes from snapshots of the totals that the leading dispatcher takes
at the start of every minute (:func:`snapshot`): the counts for a day, the
duration buckets for two hours. With no dispatcher running there are no new
snapshots, so windows and charts have no data for that time.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from .keys import Keys
from .records import encode_tally

# Upper bounds (seconds) of the run duration buckets: lib.lua's count_run()
# holds the same (a contract test checks); runs longer than the last fall in
# one more bucket, up to infinity.
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, math.inf)
OUTCOMES = ("done", "failed", "retried", "expired")
COUNTS = (*OUTCOMES, "due", "ms")  # the fields per queue of a minute's snapshot
MINUTES_KEPT = 24 * 60 + 5  # a day of per-minute counts
BUCKET_MINUTES_KEPT = 2 * 60 + 5  # two hours of per-minute duration buckets


@dataclass(frozen=True)
class QueueTotals:
    """What one queue did (since the start, or in a window): runs by outcome,
    jobs that became due into it, the run time and the cumulative histogram
    of the durations of the runs that ended by themselves (done, failed,
    retried: ``runs``) ((upper bound s, runs that took at most that), the
    last bound infinite; empty when the buckets were not kept)."""

    done: int = 0
    failed: int = 0
    retried: int = 0
    expired: int = 0
    due: int = 0
    seconds: float = 0.0
    buckets: tuple[tuple[float, int], ...] = field(default=())

    @property
    def runs(self) -> int:
        """Runs that ended by themselves (done, failed or retried)."""
        return self.done + self.failed + self.retried

    def plus(self, other: QueueTotals) -> QueueTotals:
        """Both counted together (another shard's, say): buckets summed if both have them, else whichever has."""
        buckets = self.buckets or other.buckets
        if self.buckets and other.buckets:
            buckets = tuple((bound, count + more) for (bound, count), (_, more) in zip(self.buckets, other.buckets))
        return QueueTotals(self.done + other.done, self.failed + other.failed, self.retried + other.retried,
                           self.expired + other.expired, self.due + other.due, self.seconds + other.seconds,
                           buckets)

    def minus(self, earlier: QueueTotals) -> QueueTotals:
        """What happened between ``earlier`` and this (buckets only if both have them)."""
        buckets: tuple[tuple[float, int], ...] = ()
        if self.buckets and earlier.buckets:
            buckets = tuple((bound, count - before) for (bound, count), (_, before) in zip(self.buckets, earlier.buckets))
        return QueueTotals(self.done - earlier.done, self.failed - earlier.failed, self.retried - earlier.retried,
                           self.expired - earlier.expired, self.due - earlier.due, self.seconds - earlier.seconds,
                           buckets)


TALLY_SECONDS = 1.0  # a slot sends its tally with a finish at most this often (and when it goes idle)


class Tally:
    """The runs a slot ended, counted in memory and sent to the totals with
    a later finish (records.encode_tally): a job's finish sends nothing more,
    and a second's worth of runs costs one increment per field. Lost if the
    slot's process dies before it sends them (at most a second's counts)."""

    def __init__(self) -> None:
        # Keyed by tuples, not by the fields' names: no name is formatted per
        # run, only per field when the tally is sent.
        self.runs: dict[tuple[str, str, int], int] = {}  # (queue, outcome, bucket) -> runs
        self.ms: dict[str, int] = {}  # queue -> milliseconds its completed runs took
        self.sent_at = -math.inf

    def add(self, queue: str, outcome: str, seconds: float) -> None:
        """A run of ``queue`` that ended (``outcome``: one of OUTCOMES) after ``seconds``."""
        if seconds < 0.0:  # comparisons, not min(max()): on every job's path
            seconds = 0.0
        elif seconds > 1e9:
            seconds = 1e9
        runs = self.runs
        key = (queue, outcome, bisect.bisect_left(BUCKETS, seconds) + 1)
        runs[key] = runs.get(key, 0) + 1
        if outcome != "expired":  # a run that did not complete took no service time of its own
            ms = self.ms
            ms[queue] = ms.get(queue, 0) + round(seconds * 1000)

    def take(self, now: float, force: bool = False) -> str:
        """The tally to send now ('' if none, or sent less than TALLY_SECONDS ago unless ``force``)."""
        if not self.runs or (not force and now - self.sent_at < TALLY_SECONDS):
            return ""
        counts = {f"{queue}|{outcome}|{bucket}": runs for (queue, outcome, bucket), runs in self.runs.items()}
        counts.update((f"{queue}|ms", ms) for queue, ms in self.ms.items())
        self.runs.clear()
        self.ms.clear()
        self.sent_at = now
        return encode_tally(counts)


def outcome_of(kind: str, error: str, status: str) -> str:
    """How a run a slot ended counts: expired (did not complete: its timeout,
    status EXP), retried (it raised and runs again, RTY), failed, or done."""
    if kind == "expired" or status == "EXP":
        return "expired"
    if error:
        return "retried" if status == "RTY" else "failed"
    return "done"


def _split(name: str) -> tuple[str, str, int | None] | None:
    """A totals field -> (queue, what, bucket): "q|done|3" -> ("q", "done", 3),
    "q|ms" -> ("q", "ms", None); None for a field of another shape."""
    queue, _, rest = name.rpartition("|")
    if rest in ("ms", "due", *OUTCOMES) and queue:
        return queue, rest, None
    if not rest.isdigit() or not 1 <= int(rest) <= len(BUCKETS):
        return None
    queue, _, outcome = queue.rpartition("|")
    return (queue, outcome, int(rest)) if queue and outcome in OUTCOMES else None


def parse(fields: dict[str, str], with_buckets: bool = True) -> dict[str, QueueTotals]:
    """The totals hash (or a minute's snapshot of it) -> per queue totals.
    A snapshot's counts carry a field per outcome; the totals only buckets."""
    counts: dict[str, dict[str, int]] = {}
    histograms: dict[str, list[int]] = {}
    for name, value in fields.items():
        parts = _split(name)
        if parts is None:
            continue
        queue, what, bucket = parts
        try:
            amount = int(value)
        except ValueError:
            continue
        mine = counts.setdefault(queue, {})
        mine[what] = mine.get(what, 0) + amount
        if bucket is not None and what != "expired":  # the histogram: runs that ended by themselves
            histograms.setdefault(queue, [0] * len(BUCKETS))[bucket - 1] += amount
    shown = {}
    for queue, mine in sorted(counts.items()):
        buckets: tuple[tuple[float, int], ...] = ()
        if with_buckets:
            running = 0
            cumulative = []
            for bound, count in zip(BUCKETS, histograms.get(queue, [0] * len(BUCKETS))):
                running += count
                cumulative.append((bound, running))
            buckets = tuple(cumulative)
        shown[queue] = QueueTotals(mine.get("done", 0), mine.get("failed", 0), mine.get("retried", 0),
                                   mine.get("expired", 0), mine.get("due", 0), mine.get("ms", 0) / 1000, buckets)
    return shown


def totals(client: redis.Redis, keys: Keys) -> dict[str, QueueTotals]:
    """Per queue, everything counted since the start."""
    return parse(_text(client.hgetall(keys.totals)))


def _text(fields: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()}


def _counts_of(fields: dict[str, str]) -> dict[str, str]:
    """The totals' fields summed over duration buckets: a minute's snapshot."""
    summed: dict[str, int] = {}
    for queue, one in parse(fields, with_buckets=False).items():
        for what in COUNTS:
            value = round(one.seconds * 1000) if what == "ms" else getattr(one, what)
            summed[f"{queue}|{what}"] = value
    return {name: str(value) for name, value in summed.items()}


def snapshot(client: redis.Redis, keys: Keys, now: float) -> bool:
    """Keep the totals as they are now as the snapshot of this minute, unless
    it is taken already. True if this call took it."""
    minute = int(now // 60)
    if client.exists(keys.stats_minute(minute)):
        return False
    fields = _text(client.hgetall(keys.totals))
    taken = {"": ""}  # an empty hash is no key: this field marks a snapshot of no counts
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.stats_minute(minute), mapping=cast("dict[Any, Any]", _counts_of(fields) or taken))
        pipe.expire(keys.stats_minute(minute), MINUTES_KEPT * 60)
        pipe.hset(keys.stats_buckets(minute), mapping=cast("dict[Any, Any]", fields or taken))
        pipe.expire(keys.stats_buckets(minute), BUCKET_MINUTES_KEPT * 60)
        pipe.execute()
    return True


def _snapshots(client: redis.Redis, keys: Keys, minutes: list[int],
               with_buckets: bool) -> list[dict[str, QueueTotals] | None]:
    with client.pipeline(transaction=False) as pipe:
        for minute in minutes:
            pipe.hgetall(keys.stats_buckets(minute) if with_buckets else keys.stats_minute(minute))
        found = pipe.execute()
    return [parse(_text(fields), with_buckets) if fields else None for fields in found]


def since(client: redis.Redis, keys: Keys, now: float, seconds: int) -> tuple[float | None, dict[str, QueueTotals]]:
    """What happened since the first snapshot at most ``seconds`` old: its
    time (None, and nothing, if there is none) and per queue counts. With
    buckets when the window is within the two hours they are kept."""
    first = int((now - seconds) // 60) + (1 if (now - seconds) % 60 else 0)
    minutes = list(range(first, int(now // 60) + 1))
    with_buckets = seconds <= (BUCKET_MINUTES_KEPT - 5) * 60
    for minute, earlier in zip(minutes, _snapshots(client, keys, minutes, with_buckets)):
        if earlier is not None:
            current = parse(_text(client.hgetall(keys.totals)), with_buckets)
            empty = QueueTotals(buckets=tuple((bound, 0) for bound in BUCKETS) if with_buckets else ())
            return minute * 60.0, {queue: one.minus(earlier.get(queue, empty)) for queue, one in current.items()}
    return None, {}


def window(client: redis.Redis, keys: Keys, now: float, seconds: int) -> dict[str, QueueTotals]:
    """Per queue, what happened in (about: minute resolution) the last ``seconds``; see :func:`since`."""
    return since(client, keys, now, seconds)[1]


def per_minute(client: redis.Redis, keys: Keys, now: float,
               minutes: int = 60) -> list[tuple[int, dict[str, QueueTotals]]]:
    """The last ``minutes`` minutes, oldest first: (minute start, per queue
    counts of that minute), the current minute so far last. A minute whose
    snapshot (or the next one) is missing is left out, but for the latest
    snapshot's minute: it runs to now, as the current one does (a dispatcher
    takes the new minute's snapshot a moment after the minute begins, and
    until then the minute before is still going on)."""
    current = int(now // 60)
    starts = list(range(current - minutes + 1, current + 1))
    found = _snapshots(client, keys, [*starts, current + 1], with_buckets=False)
    found[-1] = parse(_text(client.hgetall(keys.totals)), with_buckets=False)
    latest = max((i for i, snap in enumerate(found[:-1]) if snap is not None), default=None)
    shown = []
    for i, (start, begin) in enumerate(zip(starts, found)):
        end = found[-1] if i == latest else found[i + 1]
        if begin is not None and end is not None:
            shown.append((start * 60, {queue: one.minus(begin.get(queue, QueueTotals())) for queue, one in end.items()}))
    return shown
