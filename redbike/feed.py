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
batch that went in, and only that one batch can be fed again (handlers must
be idempotent).

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
import importlib
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import redis

from .api import Redbike
from .lease import KeyLease
from .names import BadName, check_feed_name, check_jobid
from .records import DEFAULT_MAX_DATA_BYTES, DataError, encode_data
from .workerspec import WorkerSpecError, parse_spec

log = logging.getLogger(__name__)

MARK = "__redbike_feed_source__"
HIGH_WATER = 10_000  # --high-water: most of a feed's jobs outstanding
BATCH = 500  # --batch: items per transaction
LEASE_MS = 10_000  # the feeder's lease; renewed by every batch, and every RENEW_EVERY s while it waits
RENEW_EVERY = 3.0
BATCH_SECONDS = 1.0  # a batch goes in when full, or this long after its first item (a slow iterator)
MIN_SLEEP, MAX_SLEEP = 0.05, 1.0  # seconds between polls while the feed is at its high-water mark
LOG_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
F = TypeVar("F", bound=Callable[..., Any])


def feed_source(function: F) -> F:
    """Mark ``function`` as one `redbike feed` may call: only marked
    functions are, so a spec cannot name ``os:system`` or the like."""
    setattr(function, MARK, True)
    return function


class Item(NamedTuple):
    """An item with its own cursor: the feed resumes with ``last=cursor``
    after it (JSON: a string, a number, a list...)."""

    jobid: str
    data: Any = None
    cursor: Any = None


class Total(NamedTuple):
    """Yielded by a feed function: ``remaining`` items follow (for the ETA)."""

    remaining: int


class BadItem(ValueError):
    """The function yielded something that is not an item (exit 2)."""


class SourceFailed(Exception):
    """The feed function raised (exit 1)."""


class FeedBusy(Exception):
    """Another feeder holds the feed's lease, or took it (exit 1)."""


# ------------------------------------------------------------ the function


def parse_arguments(words: Iterable[str]) -> dict[str, str]:
    """``ARG=VALUE`` words as keyword arguments (strings); ValueError for another word."""
    kwargs: dict[str, str] = {}
    for word in words:
        name, has_value, value = word.partition("=")
        if not has_value or not name.isidentifier():
            raise ValueError(f"bad feed argument {word!r}: expected NAME=VALUE")
        if name == "last":
            raise ValueError("the feed argument 'last' is the cursor, given by the feeder")
        kwargs[name] = value
    return kwargs


@dataclass
class Source:
    """A feed function, imported and checked, with its arguments."""

    spec: str
    function: Callable[..., Any]
    args: list[object]
    kwargs: dict[str, object]

    @classmethod
    def load(cls, spec: str, words: Iterable[str] = ()) -> Source:
        """Import ``module:function`` (literal arguments allowed, as in a
        worker spec) and check it is marked; WorkerSpecError otherwise."""
        module_name, path, args, kwargs = parse_spec(spec)
        kwargs.update(parse_arguments(words))
        if "last" in kwargs:
            raise ValueError("the feed argument 'last' is the cursor, given by the feeder")
        if os.getcwd() not in sys.path:  # a module in the current folder is found, as a worker's is
            sys.path.insert(0, os.getcwd())
        try:
            target: object = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - whatever the module raised: one line
            reason = " ".join(str(exc).split()) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            raise WorkerSpecError(f"cannot import feed module {module_name!r}: {reason}") from None
        for i, name in enumerate(path):
            try:
                target = getattr(target, name)
            except AttributeError:
                raise WorkerSpecError(f"{'.'.join([module_name, *path[:i]])!r} has no attribute {name!r}") from None
        if not callable(target) or not getattr(target, MARK, False):
            raise WorkerSpecError(f"feed {spec!r} is not a function marked with @redbike.feed.feed_source")
        return cls(spec, target, args, kwargs)

    @property
    def default_name(self) -> str:
        module_name, path, _, _ = parse_spec(self.spec)
        return ".".join([module_name, *path])

    def open(self, cursor: Any) -> tuple[Iterator[Any], int | None]:
        """Call the function from ``cursor``: its items, and how many when it says (len())."""
        try:
            returned = self.function(*self.args, last=cursor, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever the user's function raised: one line
            raise SourceFailed(f"feed {self.spec} raised {one_line(exc)}") from None
        try:
            items = iter(returned)
        except TypeError:
            raise BadItem(f"feed {self.spec} returned {type(returned).__name__}, not an iterable") from None
        try:
            total = len(returned)
        except TypeError:
            total = None
        return items, total


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Fed(NamedTuple):
    """One item, checked: its job's id, data (None: none) and cursor."""

    jobid: str
    data: Any
    cursor: Any


def check_item(item: object, number: int, queue: str | None, queue_of: Callable[[str], str],
               max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> Fed:
    """An item as the feed puts it in (BadItem: one line naming it)."""
    where = f"item {number}"
    if isinstance(item, Item):
        jobid, data, cursor = item.jobid, item.data, item.cursor if item.cursor is not None else item.jobid
    elif isinstance(item, str):
        jobid, data, cursor = item, None, item
    elif isinstance(item, tuple) and len(item) == 2:
        jobid, data, cursor = item[0], item[1], item[0]
    else:
        raise BadItem(f"{where}: expected a job id or (job id, data), got {shorten(repr(item))}")
    if not isinstance(jobid, str):
        raise BadItem(f"{where}: the job id {shorten(repr(jobid))} is not a string")
    full = f"{jobid}:{queue}" if queue is not None else jobid
    try:
        check_jobid(full)
        routed = queue_of(full)
    except BadName as exc:
        raise BadItem(f"{where}: {exc}") from None
    if queue is not None and routed != queue:
        raise BadItem(f"{where}: the worker routes {full!r} to queue {routed!r}, not {queue!r}")
    if data is not None:
        try:
            encode_data(data, max_data_bytes)
        except DataError as exc:
            raise BadItem(f"{where} ({jobid}): {exc}") from None
    try:
        json.dumps(cursor, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadItem(f"{where} ({jobid}): its cursor is not JSON: {exc}") from None
    return Fed(full, data, cursor)


def shorten(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."


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
            with self.bike.client.pipeline() as pipe:
                try:
                    pipe.watch(self.lease.key)
                    if pipe.get(self.lease.key) == holder:
                        pipe.multi()
                        pipe.delete(self.lease.key)
                        pipe.execute()
                except redis.WatchError:
                    pass
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
        sent: list[str] = []
        now = self.bike.clock()

        def act(pipe: Any) -> None:
            queued = self.bike.set_alike(((fed.jobid, None, fed.data) for fed in batch), "NOW", client=pipe)
            refused = [(jobid, error) for jobid, error in queued.items() if error is not True]
            if refused:  # every item was checked (check_item): not expected
                raise SourceFailed(f"feed {self.name}: {refused[0][0]} refused: {refused[0][1]}")
            sent.extend(queued)
            if batch:
                pipe.zadd(self.jobs_key, {fed.jobid: first + i for i, fed in enumerate(batch)})
                pipe.hset(self.key, "cursor", json.dumps(batch[-1].cursor, separators=(",", ":")))
            pipe.hincrby(self.key, "fed", len(batch))
            pipe.hset(self.key, mapping={"exhausted": int(exhausted), "updated": repr(now)})
            pipe.sadd(self.bike.keys.feeds, self.name)

        replies = self.fenced(act)
        errors = [(jobid, reply) for jobid, reply in zip(sent, replies, strict=False) if isinstance(reply, Exception)]
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
            self.fenced(lambda pipe: pipe.hset(self.key, mapping={
                "source": self.source.spec, "started": repr(self.bike.clock()), "exhausted": 0}))
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


# ------------------------------------------------------------ progress


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
                from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
                from rich.progress import Progress as Bar
            except ImportError:  # the views extra is not installed: lines, as off a terminal
                self.terminal = False
                return
            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=False)
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


FEED_FIELDS = ("name", "cursor", "fed", "done", "failed", "waiting", "rate", "state")


def feeds(client: redis.Redis, keys: Any) -> Iterator[tuple[Any, ...]]:
    """Each feed's FEED_FIELDS: state ``feeding`` (a feeder holds its lease),
    ``finished`` (its iterator ran out and its jobs ended), ``exhausted`` (ran
    out; jobs outstanding) or ``stopped``; rate: items ended per second
    (0 when no feeder runs)."""
    names = sorted(client.smembers(keys.feeds))
    for name in names:
        with client.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.feed(name))
            pipe.zcard(keys.feed_jobs(name))
            pipe.exists(keys.feed_lease(name))
            stored, waiting, feeding = pipe.execute()
        exhausted = stored.get("exhausted") == "1"
        state = "feeding" if feeding else ("finished" if waiting == 0 else "exhausted") if exhausted else "stopped"
        yield (name, stored.get("cursor", ""), int(stored.get("fed") or 0), int(stored.get("done") or 0),
               int(stored.get("failed") or 0), waiting, stored.get("rate", "0") if feeding else "0", state)
