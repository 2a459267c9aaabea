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
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

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
from .feedview import FEED_FIELDS, Progress, feeds
from .jobinput import Queued
from .lease import KeyLease
from .names import check_feed_name

__all__ = ["FEED_FIELDS", "BadItem", "FeedBusy", "Feeder", "Item", "Source", "SourceFailed", "Total", "feed_source",
           "feeds", "run_feed"]

log = logging.getLogger(__name__)

HIGH_WATER = 10_000  # --high-water: most of a feed's jobs outstanding
BATCH = 500  # --batch: items per transaction
LEASE_MS = 10_000  # the feeder's lease; renewed by every batch, and every RENEW_EVERY s while it waits
RENEW_EVERY = 3.0
BATCH_SECONDS = 1.0  # a batch goes in when full, or this long after its first item (a slow iterator)
MIN_SLEEP, MAX_SLEEP = 0.05, 1.0  # seconds between polls while the feed is at its high-water mark


class FeedBusy(Exception):
    """Another feeder holds the feed's lease, or took it (exit 1)."""


# ------------------------------------------------------------ the feeder


@dataclass
class Counts:
    """A feed's counters as stored (its hash) and its outstanding jobs."""

    fed: int = 0
    done: int = 0
    failed: int = 0
    outstanding: int = 0


@dataclass
class Feeder:
    """One feed's feeder: see the module's doc."""

    bike: Redbike
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
        if self.queue is not None:
            self.bike._queue_of(f"x:{self.queue}")  # a bad --queue fails before anything is fed
        # A batch is at most half the high-water mark, so that the feed goes on
        # while the workers drain the other half.
        self.batch = max(1, min(self.batch, self.high_water // 2))
        self.low_water = self.high_water - self.batch
        keys = self.bike.keys
        self.key, self.jobs_key = keys.feed(self.name), keys.feed_jobs(self.name)
        self.lease = KeyLease(self.bike.client, keys.feed_lease(self.name), LEASE_MS)
        self.counts = Counts()
        self.rate = Rate()
        self.renewed = 0.0
        self.number = 0  # items taken from the iterator in this run
        self.full = False  # the last poll found as many ended as it looked at

    # -------------------------------------------------------- the lease

    def take_lease(self) -> None:
        """Hold the feed's lease (FeedBusy if another live feeder does). A
        holder on this host whose process is gone (killed) gives it up at once."""
        if self.lease.acquire():
            self.renewed = time.monotonic()
            return
        holder = self.lease.holder() or ""
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            self.lease.break_if(holder)
            log.info("feed %s: its last feeder (%s) is gone; taking over", self.name, holder)
            if self.lease.acquire():
                self.renewed = time.monotonic()
                return
            holder = self.lease.holder() or holder
        raise FeedBusy(f"feed {self.name} is being fed by {holder} (its lease expires within "
                       f"{self.lease.expires_in():.0f} s unless renewed)")

    def keep_lease(self) -> None:
        if time.monotonic() - self.renewed >= RENEW_EVERY:
            self.fenced(lambda pipe: None)

    def fenced(self, act: Callable[[Any], object]) -> list[Any]:
        replies = self.lease.if_mine(act)
        if replies is False:
            raise FeedBusy(f"feed {self.name}: lost its lease to {self.lease.holder()}; stopped")
        self.renewed = time.monotonic()
        return list(replies)

    # -------------------------------------------------------- Redis

    def read(self) -> dict[str, str]:
        with self.bike.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.key)
            pipe.zcard(self.jobs_key)
            stored, outstanding = pipe.execute()
        fed, done, failed = (int(stored.get(name) or 0) for name in ("fed", "done", "failed"))
        self.counts = Counts(fed, done, failed, outstanding)
        return dict(stored)

    def poll(self) -> int:
        """feed_done.lua: count (and remove) the feed's jobs that ended; how many are outstanding."""
        most = min(5000, max(2 * self.batch, 100))
        outstanding, done, failed = self.bike.scripts.run(
            "feed_done", self.bike.clock(), [self.key, self.jobs_key],
            [most, 2 * most + 200, f"{self.rate.per_second():.3f}"])
        self.counts.done += done
        self.counts.failed += failed
        self.full = done + failed >= most  # more may have ended than it looked at: look again at once
        self.counts.outstanding = outstanding
        self.rate.add(self.counts.done + self.counts.failed)
        return int(outstanding)

    def commit(self, batch: list[Fed], exhausted: bool) -> None:
        """Put ``batch`` in with the checkpoint after it, in one fenced transaction."""
        first = self.counts.fed
        queued = Queued()
        now = self.bike.clock()

        def act(pipe: Any) -> None:
            nonlocal queued
            queued = self.bike.queue_alike(pipe, ((fed.jobid, None, fed.data) for fed in batch), "NOW")
            if queued.refused:  # every item was checked (check_item): not expected
                jobid, error = next(iter(queued.refused.items()))
                raise SourceFailed(f"feed {self.name}: {jobid} refused: {error}")
            if batch:
                pipe.zadd(self.jobs_key, {fed.jobid: first + i for i, fed in enumerate(batch)})
                pipe.hset(self.key, "cursor", json.dumps(batch[-1].cursor, separators=(",", ":")))
            pipe.hincrby(self.key, "fed", len(batch))
            pipe.hset(self.key, mapping={"exhausted": int(exhausted), "updated": repr(now)})
            pipe.sadd(self.bike.keys.feeds, self.name)

        replies = self.fenced(act)
        errors = [(jobid, reply) for jobid, reply in queued.results(replies).items() if isinstance(reply, Exception)]
        if errors:
            jobid, error = errors[0]
            raise SourceFailed(f"feed {self.name}: {len(errors)} job(s) refused, the first {jobid}: {error}")
        self.counts.fed += len(batch)
        self.counts.outstanding += len(batch)

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
            batch.append(check_item(item, self.number, self.queue, self.bike._queue_of, self.bike.max_data_bytes))
            if time.monotonic() - started >= BATCH_SECONDS:
                break
        return batch, False

    def run(self) -> Counts:
        """Feed until the iterator ends (and, with ``wait``, until its jobs
        have ended), or a signal; the feed's counts at the end."""
        self.take_lease()
        try:
            stored = self.read()
            if stored.get("source") not in (None, self.source.spec):
                log.warning("feed %s was fed by %s before; resuming from its cursor with %s",
                            self.name, stored["source"], self.source.spec)
            cursor = json.loads(stored["cursor"]) if "cursor" in stored else None
            started = {"source": self.source.spec, "started": repr(self.bike.clock()), "exhausted": 0}
            self.fenced(lambda pipe: (pipe.hset(self.key, mapping=started), pipe.sadd(self.bike.keys.feeds, self.name)))
            items, total = self.source.open(cursor)
            if self.progress is not None:
                self.progress.start(self, total)
            log.debug("feed %s: %s from cursor %s", self.name, self.source.spec, json.dumps(cursor))
            self.loop(items)
        finally:
            if self.progress is not None:
                self.progress.stop()
            try:
                self.lease.release()
            except redis.RedisError:
                pass  # it expires
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
            self.keep_lease()
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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def run_feed(bike: Redbike, spec: str, words: Iterable[str], *, name: str | None = None, queue: str | None = None,
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
