"""`redbike feed --source=URL`: the work-queue pattern's source of one-off
work, polled.

``GET URL`` answers ``{"kind": "ItemList", "apiVersion": "v1", "items":
[names]}`` and ``GET URL/NAME`` ``{"kind": "Item", "apiVersion": "v1",
"data": ...}`` (any other kind or version is refused with one line, as for
node sources). Every poll, each listed item not yet put in becomes a one-off
job (schedule NOW) whose payload is the item's ``data``; an item that left
the list before its job ran (still queued or waiting for a resource) is
cancelled: its job is unset.

What was put in is tracked in Redis, ``P:feed:NAME:seen`` (item name -> job
id), bounded by the list: an item that left the list leaves it too. An item
is put in once while it stays listed, however often the list is polled, and
whichever feeder polls: one holds the feed's lease (lease.KeyLease) and
writes each poll's new jobs and their names in one transaction fenced by it.
An item listed again after it left is new again.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
import urllib.parse
from typing import Any, NoReturn

from .api import Redbike
from .feed import LEASE_MS, FeedBusy
from .lease import KeyLease
from .names import BadName, check_feed_name, check_jobid
from .nodesources import HTTP_TIMEOUT, SourceError, get_v1
from .records import DataError, encode_data

log = logging.getLogger(__name__)

WAITING = ("ENQ", "TML")  # a job that has not run yet (in its queue or parked, or waiting for its time)


class HttpItems:
    """The source's two requests."""

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def names(self) -> list[str]:
        items = get_v1(self.url, "ItemList", self.timeout).get("items")
        if not isinstance(items, list) or not all(isinstance(name, str) and name for name in items):
            raise SourceError(f"GET {self.url}: 'items' must be a list of item names")
        return list(dict.fromkeys(items))

    def data(self, name: str) -> Any:
        return get_v1(f"{self.url}/{urllib.parse.quote(name, safe='')}", "Item", self.timeout).get("data")


class HttpFeeder:
    """One poll at a time: put the new items in, cancel those that left."""

    def __init__(self, bike: Redbike, url: str, name: str, queue: str | None = None) -> None:
        check_feed_name(name)
        self.bike, self.name, self.queue = bike, name, queue
        self.source = HttpItems(url)
        self.seen_key = bike.keys.feed_seen(name)
        self.lease = KeyLease(bike.client, bike.keys.feed_lease(name), LEASE_MS)
        self.refused: set[str] = set()  # item names refused once: said once

    def job_of(self, name: str) -> str:
        jobid = f"{name}:{self.queue}" if self.queue is not None else name
        check_jobid(jobid)
        if self.queue is not None and self.bike.worker.queue_for(jobid) != self.queue:
            raise BadName(f"the worker routes {jobid!r} to queue {self.bike.worker.queue_for(jobid)!r}")
        return jobid

    def poll(self) -> tuple[int, int]:
        """One poll: (items put in, jobs cancelled). SourceError if the list cannot be had."""
        if not self.lease.acquire():
            raise FeedBusy(f"feed {self.name} is being fed by {self.lease.holder()}")
        listed = self.source.names()
        seen: dict[str, str] = self.bike.client.hgetall(self.seen_key)  # type: ignore[assignment]
        new: list[tuple[str, str, Any]] = []
        for name in listed:
            if name in seen:
                continue
            try:
                new.append((name, self.job_of(name), self.source.data(name)))
            except (BadName, SourceError) as exc:  # this item only: the others go in
                if name not in self.refused:
                    log.error("feed %s: item %r left out: %s", self.name, name, exc)
                    self.refused.add(name)
        new = [item for item in new if self._payload_fits(item)]
        gone = {name: jobid for name, jobid in seen.items() if name not in set(listed)}
        if (new or gone) and self.lease.if_mine(lambda pipe: self._write(pipe, new, gone)) is False:
            self._lost()
        cancelled = self._cancel(list(gone.values()))
        for name, jobid, _ in new:
            log.info("feed %s: item %s put in as %s", self.name, name, jobid)
        return len(new), cancelled

    def _payload_fits(self, item: tuple[str, str, Any]) -> bool:
        try:
            encode_data(item[2], self.bike.max_data_bytes)
        except DataError as exc:
            if item[0] not in self.refused:
                log.error("feed %s: item %r left out: %s", self.name, item[0], exc)
                self.refused.add(item[0])
            return False
        return True

    def _write(self, pipe: Any, new: list[tuple[str, str, Any]], gone: dict[str, str]) -> None:
        if new:
            self.bike.queue_alike(pipe, [(jobid, None, data) for _, jobid, data in new], "NOW")
            pipe.hset(self.seen_key, mapping={name: jobid for name, jobid, _ in new})
        if gone:
            pipe.hdel(self.seen_key, *gone)

    def keep_lease(self) -> None:
        """Renew the feed's lease between polls; FeedBusy if another feeder took it."""
        if not self.lease.acquire():
            self._lost()

    def _lost(self) -> NoReturn:
        raise FeedBusy(f"feed {self.name}: lost its lease to {self.lease.holder()}; stopped")

    def _cancel(self, jobids: list[str]) -> int:
        """Unset the jobs of items that left the list and have not run yet."""
        if not jobids:
            return 0
        statuses = self.bike.client.hmget(self.bike.keys.statuses, jobids)
        waiting = [jobid for jobid, status in zip(jobids, statuses, strict=True)
                   if status and str(status).split(":")[0] in WAITING]
        cancelled = 0
        for jobid, result in self.bike.unset_many(waiting).items():
            if isinstance(result, Exception):
                log.error("feed %s: %s could not be cancelled: %s", self.name, jobid, result)
            else:
                cancelled += 1
                log.info("feed %s: its item left the list before it ran: %s cancelled", self.name, jobid)
        return cancelled


def run_http_source(bike: Redbike, url: str, *, name: str | None = None, queue: str | None = None,
                    every: float = 10.0, once: bool = False) -> int:
    """Poll ``url`` every ``every`` seconds until a signal (or once); the exit status."""
    feeder = HttpFeeder(bike, url, name or urllib.parse.urlsplit(url).hostname or "http", queue)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))
    try:
        while True:
            try:
                added, cancelled = feeder.poll()
                if added or cancelled:
                    log.info("feed %s: %d put in, %d cancelled", feeder.name, added, cancelled)
            except SourceError as exc:  # the next poll tries again; --once says so and fails
                if once:
                    print(f"redbike: feed {feeder.name}: {exc}", file=sys.stderr)
                    return 1
                log.error("feed %s: %s", feeder.name, exc)
            if once:
                return 0
            deadline = time.monotonic() + every
            renewed = time.monotonic()
            while not stopping and time.monotonic() < deadline:
                time.sleep(min(0.2, every))
                if time.monotonic() - renewed >= LEASE_MS / 3000:  # held between polls too
                    feeder.keep_lease()
                    renewed = time.monotonic()
            if stopping:
                return 0
    finally:
        feeder.lease.release()
