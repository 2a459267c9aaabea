"""`redbike feed`: one-off jobs fed from a resumable iterator, in bounded memory.

A feed function, named like a worker (``module:function``, parsed and never
evaluated, marked with :func:`feed_source` so that a spec cannot name
``os:system``), is called ``function(last=CURSOR, **args)`` and yields items:

- a job id (``"img-1"``), or ``(jobid, data)`` (data: the job's payload,
  JSON, at most the config's max-data-bytes encoded);
- :class:`Item` ``(jobid, data=None, cursor=...)``: the same, with the
  cursor to resume after it (default: the item's job id as yielded);
- :class:`Total` ``(n)``: how many items follow (for the progress bar's ETA;
  a function that returns a sized iterable, a list or a ``range``, needs none).

Each item becomes a one-off job (schedule NOW). The feeder (:class:`Feeder`)
holds the feed's lease (lease.KeyLease: one feeder per feed name) and puts
items in in batches: each batch's set.lua calls, the ids added to the feed's
outstanding jobs, the cursor after its last item and the count fed go in
ONE transaction, fenced by the lease (WATCH, token checked, MULTI ... EXEC).
So a checkpoint never runs ahead of what was put in, nor behind it by more
than that batch: killed at any instant, the feeder resumes from the last
batch that went in, and takes again from the iterator only the batch it was
putting in, which had not gone in (jobs still run at least once, not
exactly once: handlers must be idempotent).

Over ``shards = N`` (feedshards.py) each item's job lives on its own shard
(``shards.of(jobid)``), and nothing crosses shards inside Redis, so a batch
cannot go in in one transaction. Every shard holds the feed's keys of its
own: its counters and ``through`` (the number of the last item of the last
batch it got, counting every item the feed took), its outstanding jobs and a
copy of the lease. Shard 0's hash is the feed's (cursor, source, state).

- The lease: the feeder takes it on every shard in shard order, all or none
  (one held by a live feeder: it gives back those it took, FeedBusy), and
  fences each shard's writes by that shard's copy. A feeder that takes over
  has written its token on every shard before it reads or writes anything,
  so an old feeder's transaction on any shard fails from then on.
- A batch goes in shard by shard, shard 0 first: on every shard (also one
  that got no item of it) one fenced transaction with that shard's items,
  their ids among its outstanding jobs, its count fed and ``through``; shard
  0's also holds the cursor and a record of the batch's items on the other
  shards (``feed_batch``: ids, payloads, numbers). Killed before shard 0's
  EXEC, nothing of the batch went in anywhere; after it, the batch is
  decided: the next feeder finds the shards whose ``through`` is behind
  shard 0's and puts their items of the record in first (resume), then goes
  on from shard 0's cursor. So no item is lost or put in twice, whatever the
  iterator yields when it is called again (a scheme that skipped on each
  shard the items numbered at or below its ``through`` would need the
  iterator to yield the same items in the same order after a cursor: one
  inserted meanwhile would shift the numbers and be skipped). The cost: a
  batch's items of the other shards are written twice on shard 0, and held
  there until the next batch (memory: one batch).
- Backpressure and the counts: feed_done.lua on every shard, summed.
- With one shard, this is one transaction per batch, as above: no
  ``through``, no record, today's keys.

Backpressure and retention need no change on the workers' path: the feeder
polls feed_done.lua, which looks at its oldest outstanding jobs, counts
those that ended and removes at once those that ran to their end. It feeds
while fewer than the low-water mark (high-water minus a batch) are
outstanding, and otherwise sleeps for the time the observed rate needs to
drain down to it (from 50 ms to 1 s; backing off to 1 s while nothing ends):
a job's end publishes nothing the feeder could hear (finish.lua only
publishes when a queue becomes non-empty), and this costs one script call
per batch or per second, whichever is more frequent.
"""

from __future__ import annotations

import collections
import json
import logging
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .api import Redbike
from .feeditems import (
    BadItem,
    Fed,
    Item,
    Source,
    SourceFailed,
    Total,
    check_item,
    feed_source,
    one_line,
)
from .feedshards import LEASE_MS, Counts, FeedBusy, FeedShards, feed_parts
from .feedview import FEED_FIELDS, Progress, feeds
from .names import check_feed_name
from .sharded import ShardedRedbike

__all__ = ["FEED_FIELDS", "LEASE_MS", "BadItem", "Counts", "FeedBusy", "Feeder", "Item", "Source", "SourceFailed",
           "Total", "feed_source", "feeds", "run_feed"]

log = logging.getLogger(__name__)

HIGH_WATER = 10_000  # --high-water: most of a feed's jobs outstanding
BATCH = 500  # --batch: items per transaction
BATCH_SECONDS = 1.0  # a batch goes in when full, or this long after its first item (a slow iterator)
MIN_SLEEP, MAX_SLEEP = 0.05, 1.0  # seconds between polls while the feed is at its high-water mark


@dataclass
class Feeder:
    """One feed's feeder: see the module's doc."""

    bike: Redbike | ShardedRedbike
    source: Source
    name: str
    queue: str | None = None
    high_water: int = HIGH_WATER
    batch: int = BATCH
    wait: bool = False
    progress: Progress | None = None
    stopping: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_feed_name(self.name)
        self.queue_of = feed_parts(self.bike)[0]._queue_of  # every shard's Redbike has the one worker
        if self.queue is not None:
            self.queue_of(f"x:{self.queue}")  # a bad --queue fails before anything is fed
        # A batch is at most half the high-water mark, so that the feed goes on
        # while the workers drain the other half.
        self.batch = max(1, min(self.batch, self.high_water // 2))
        self.low_water = self.high_water - self.batch
        self.shards = FeedShards(self.bike, self.name)
        self.rate = Rate()
        self.number = 0  # items taken from the iterator in this run
        self.full = False  # the last poll found as many ended as it looked at

    @property
    def counts(self) -> Counts:
        """The feed's counts (over shards, summed)."""
        return self.shards.counts

    def poll(self) -> int:
        """feed_done.lua: count (and remove) the feed's jobs that ended; how many are outstanding."""
        most = min(5000, max(2 * self.batch, 100))
        outstanding, _, _, self.full = self.shards.poll(self.bike.clock(), most, self.rate.per_second())
        self.rate.add(self.counts.done + self.counts.failed)
        return outstanding

    def commit(self, batch: list[Fed], exhausted: bool) -> None:
        """Put ``batch`` in with the checkpoint after it (fenced transactions: feedshards.py)."""
        self.shards.commit(batch, exhausted, self.bike.clock())

    # -------------------------------------------------------- the loop

    def take(self, items: Iterator[Any], room: int) -> tuple[list[Fed], bool]:
        """Up to ``room`` items (fewer if the iterator is slow): the batch, and whether it ran out."""
        batch: list[Fed] = []
        started = time.monotonic()
        while len(batch) < room and not self.stopping:
            try:
                item = next(items)
            except StopIteration:
                return batch, True
            except Exception as exc:  # noqa: BLE001 - whatever the user's iterator raised: one line
                raise SourceFailed(f"feed {self.source.spec} raised {one_line(exc)} after {self.number} item(s) "
                                   f"in this run (nothing of the batch in progress was fed)") from None
            if isinstance(item, Total):
                if self.progress is not None and isinstance(item.remaining, int):
                    self.progress.total = self.number + item.remaining
                continue
            self.number += 1
            batch.append(check_item(item, self.number, self.queue, self.queue_of, self.bike.max_data_bytes))
            if time.monotonic() - started >= BATCH_SECONDS:
                break
        return batch, False

    def run(self) -> Counts:
        """Feed until the iterator ends (and, with ``wait``, until its jobs
        have ended), or a signal; the feed's counts at the end."""
        self.shards.take_lease()
        try:
            stored = self.shards.resume(self.bike.clock())
            if stored.get("source") not in (None, self.source.spec):
                log.warning("feed %s was fed by %s before; resuming from its cursor with %s",
                            self.name, stored["source"], self.source.spec)
            cursor = json.loads(stored["cursor"]) if "cursor" in stored else None
            started = {"source": self.source.spec, "started": repr(self.bike.clock()), "exhausted": 0}
            self.shards.start(started)
            items, total = self.source.open(cursor)
            if self.progress is not None:
                self.progress.start(self, total)
            log.debug("feed %s: %s from cursor %s", self.name, self.source.spec, json.dumps(cursor))
            self.loop(items)
        finally:
            if self.progress is not None:
                self.progress.stop()
            self.shards.release()
        return self.counts

    def loop(self, items: Iterator[Any]) -> None:
        exhausted = False
        drain = 0.0  # jobs the workers end per second while the feed waits (0: not known yet)
        pause = MIN_SLEEP
        asleep: tuple[int, float] | None = None  # ended and the time when the feed last went to sleep
        while not self.stopping:
            outstanding = self.poll()
            ended = self.counts.done + self.counts.failed
            if asleep is not None and ended > asleep[0]:
                # All ended: the workers may have idled part of the pause, so
                # they drain faster than this says (the next pause is shorter).
                seen = (ended - asleep[0]) / (time.monotonic() - asleep[1]) * (2 if outstanding == 0 else 1)
                drain = seen if drain == 0 else (drain + seen) / 2
            asleep = None
            if self.progress is not None:
                self.progress.show(self)
            if not exhausted and outstanding <= self.low_water:
                batch, exhausted = self.take(items, min(self.batch, self.high_water - outstanding))
                if batch or exhausted:  # (a signal stops take() early: what it took goes in)
                    self.commit(batch, exhausted)
                continue
            if exhausted and (not self.wait or outstanding == 0):
                return
            self.shards.keep_lease()
            if self.full:
                continue
            # Asleep until about enough jobs ended to feed a batch (or, at the
            # end, all of them), as long as the drain rate seen while the feed
            # last waited says that takes; backing off while nothing ends.
            need = outstanding - (self.low_water if not exhausted else 0)
            pause = min(MAX_SLEEP, max(MIN_SLEEP, need / drain)) if drain > 0 else min(MAX_SLEEP, pause * 2)
            asleep = (ended, time.monotonic())
            time.sleep(pause)

    def stop(self, signum: int, _frame: object) -> None:  # a signal handler: only sets a flag
        self.stopping.append(signum)


class Rate:
    """Items ended per second over the last minute (samples of a monotonic count)."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds = seconds
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, count: int) -> None:
        now = time.monotonic()
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.seconds:
            self.samples.popleft()

    def per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


# ------------------------------------------------------------ the commands


def run_feed(bike: Redbike | ShardedRedbike, spec: str, words: Iterable[str], *, name: str | None = None, queue: str | None = None,
             high_water: int = HIGH_WATER, batch: int = BATCH, wait: bool = False) -> int:
    """`redbike feed`: the exit status (1 if, waiting, some of its jobs failed)."""
    source = Source.load(spec, words)
    feeder = Feeder(bike, source, name or source.default_name, queue=queue, high_water=high_water, batch=batch,
                    wait=wait, progress=Progress(terminal=sys.stderr.isatty()))
    signal.signal(signal.SIGTERM, feeder.stop)
    signal.signal(signal.SIGINT, feeder.stop)
    started = time.monotonic()
    counts = feeder.run()
    seconds = time.monotonic() - started
    if feeder.stopping:
        print(f"feed {feeder.name}: stopped by a signal; fed {counts.fed}, it resumes after the last batch "
              f"that went in", file=sys.stderr)
        return 1
    summary = (f"feed {feeder.name}: {'finished' if wait else 'exhausted'}: fed {counts.fed}, done {counts.done}, "
               f"failed {counts.failed}, waiting {counts.outstanding}; {feeder.number} item(s) in "
               f"{seconds:.1f} s")
    print(summary, file=sys.stderr)
    return 1 if wait and counts.failed else 0
