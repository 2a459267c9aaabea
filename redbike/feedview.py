"""What a feed shows: the feeder's progress (a rich bar on a terminal, else
log lines) and `redbike feeds` (every feed's checkpoint and counts)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import redis

from .keys import Keys

if TYPE_CHECKING:
    from .feed import Feeder

log = logging.getLogger("redbike.feed")

LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal


class Progress:
    """What a feeder shows as it goes: a rich progress bar on a terminal,
    else an INFO line every LOG_EVERY seconds."""

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.total: int | None = None
        self.base = 0  # ended when this run started
        self.bar: Any = None
        self.task: Any = None
        self.logged = 0.0

    def start(self, feeder: Feeder, total: int | None) -> None:
        self.total = total
        self.base = feeder.counts.done + feeder.counts.failed
        self.logged = time.monotonic()  # the first line after LOG_EVERY: a feed that fails at once says one line
        if self.terminal:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, TextColumn
                from rich.progress import Progress as Bar
            except ImportError:  # the views extra is not installed: lines, as off a terminal
                self.terminal = False
                return
            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                           console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task(feeder.name, total=total, counts="")
            self.bar.start()

    def show(self, feeder: Feeder) -> None:
        counts, rate = feeder.counts, feeder.rate.per_second()
        text = (f"fed {counts.fed}, done {counts.done}, failed {counts.failed}, "
                f"waiting {counts.outstanding}, {rate:.0f} items/s")
        ended = counts.done + counts.failed - self.base
        if self.total is not None and rate > 0:
            left = max(0, self.total - ended)
            text += f", ETA {format_seconds(left / rate)}"
        if self.bar is not None:
            self.bar.update(self.task, completed=ended, total=self.total, counts=text)
        elif time.monotonic() - self.logged >= LOG_EVERY:
            self.logged = time.monotonic()
            log.info("feed %s: %s", feeder.name, text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


FEED_FIELDS = ("name", "cursor", "fed", "done", "failed", "waiting", "rate", "state")


def feeds(client: redis.Redis, keys: Keys) -> Iterator[tuple[Any, ...]]:
    """Each feed's FEED_FIELDS: state ``feeding`` (a feeder holds its lease),
    ``finished`` (its iterator ran out and its jobs ended), ``exhausted`` (ran
    out; jobs outstanding) or ``stopped``; rate: items ended per second
    (0 when no feeder runs)."""
    return feeds_over([(client, keys)])


def feeds_over(shards: Sequence[tuple[redis.Redis, Keys]]) -> Iterator[tuple[Any, ...]]:
    """feeds() over shards (each one's client and keys): the counts summed,
    the cursor, state and rate those of shard 0's hash (feed.py)."""
    names = sorted({str(name) for client, keys in shards for name in client.smembers(keys.feeds)})
    read = []
    for client, keys in shards:  # a round trip per shard for all the feeds
        with client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.feed(name))
                pipe.zcard(keys.feed_jobs(name))
                pipe.exists(keys.feed_lease(name))
            replies = pipe.execute()
        read.append([replies[i:i + 3] for i in range(0, len(replies), 3)])
    for at, name in enumerate(names):
        each = [shard[at] for shard in read]
        stored, _, feeding = each[0]
        fed, done, failed = (sum(int(hash_.get(field) or 0) for hash_, _, _ in each) for field in ("fed", "done", "failed"))
        waiting = sum(zcard for _, zcard, _ in each)
        exhausted = stored.get("exhausted") == "1"
        state = "feeding" if feeding else ("finished" if waiting == 0 else "exhausted") if exhausted else "stopped"
        yield (name, stored.get("cursor", ""), fed, done, failed, waiting, stored.get("rate", "0") if feeding else "0",
               state)
