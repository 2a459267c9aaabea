"""A feed's side on each shard (feed.py): its keys, its lease, the fenced
transaction that puts a batch's items in, and feed_done.lua's counts.

With one shard this is the feed as it always was: one lease, one fenced
transaction per batch. With ``shards = N`` each item's job lives on its own
shard (``shards.of(jobid)``), so every shard k holds the feed's keys of its
own (``keys[k].feed(name)``, ``.feed_jobs(name)``, ``.feed_lease(name)``),
and shard 0's hash is the feed's: its cursor, source and state. See feed.py
for how a batch goes in over the shards and why nothing is lost or put in
twice.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .api import Redbike
from .feeditems import Fed, SourceFailed
from .lease import KeyLease, new_token
from .sharded import ShardedRedbike

log = logging.getLogger("redbike.feed")

LEASE_MS = 10_000  # the feeder's lease; renewed by every batch, and every RENEW_EVERY s while it waits
RENEW_EVERY = 3.0


class FeedBusy(Exception):
    """Another feeder holds the feed's lease, or took it (exit 1)."""


@dataclass
class Counts:
    """A feed's counters as stored (its hash; over shards, summed) and its outstanding jobs."""

    fed: int = 0
    done: int = 0
    failed: int = 0
    outstanding: int = 0


def feed_parts(bike: Redbike | ShardedRedbike) -> list[Redbike]:
    """Each shard's Redbike (one, without shards)."""
    return bike.parts if isinstance(bike, ShardedRedbike) else [bike]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FeedShard:
    """One shard's side of a feed: its Redbike, keys and copy of the lease."""

    def __init__(self, part: Redbike, name: str, index: int, token: str) -> None:
        self.part = part
        self.index = index
        self.key, self.jobs_key = part.keys.feed(name), part.keys.feed_jobs(name)
        self.batch_key = part.keys.feed_batch(name)
        self.lease = KeyLease(part.client, part.keys.feed_lease(name), LEASE_MS, token)


class FeedShards:
    """A feed over its shards: the lease on each (all or none), each batch
    put in shard by shard (shard 0 first, with the batch's record), the
    counts summed. ``shard_of``: a job id's shard."""

    def __init__(self, bike: Redbike | ShardedRedbike, name: str) -> None:
        self.name = name
        token = new_token()
        self.shards = [FeedShard(part, name, index, token) for index, part in enumerate(feed_parts(bike))]
        self.home = self.shards[0]  # its hash is the feed's: cursor, source, state
        self.shard_of: Callable[[str], int] = bike.shards.of if isinstance(bike, ShardedRedbike) else lambda _: 0
        self.counts = Counts()
        self.stored: list[dict[str, str]] = []  # each shard's hash, as last read
        self.sequence = 0  # items put in over the feed's life (with one shard: its count fed)
        self.renewed = 0.0

    # -------------------------------------------------------- the lease

    def take_lease(self) -> None:
        """Hold the feed's lease on every shard, in shard order (FeedBusy,
        giving back those taken, if another live feeder holds one). A holder
        on this host whose process is gone (killed) gives it up at once."""
        taken: list[FeedShard] = []
        for shard in self.shards:
            if not self._take(shard):
                holder = shard.lease.holder() or ""
                left = shard.lease.expires_in()
                for mine in taken:
                    self._give_back(mine)
                raise FeedBusy(f"feed {self.name} is being fed by {holder} (its lease expires within "
                               f"{left:.0f} s unless renewed)")
            taken.append(shard)
        self.renewed = time.monotonic()

    def _take(self, shard: FeedShard) -> bool:
        if shard.lease.acquire():
            return True
        holder = shard.lease.holder() or ""
        host, _, rest = holder.partition(":")
        pid = rest.partition(":")[0]
        if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            shard.lease.break_if(holder)
            log.info("feed %s: its last feeder (%s) is gone; taking over", self.name, holder)
            return shard.lease.acquire()
        return False

    def keep_lease(self) -> None:
        """Renew the lease on every shard, if RENEW_EVERY passed since it was."""
        if time.monotonic() - self.renewed >= RENEW_EVERY:
            for shard in self.shards:
                self.fenced(shard, lambda pipe: None)

    def release(self) -> None:
        for shard in self.shards:
            self._give_back(shard)

    @staticmethod
    def _give_back(shard: FeedShard) -> None:
        try:
            shard.lease.release()
        except redis.RedisError:
            pass  # it expires

    def fenced(self, shard: FeedShard, act: Callable[[Any], object]) -> list[Any]:
        """``act`` in one transaction on ``shard``, if its lease is still ours (FeedBusy otherwise)."""
        replies = shard.lease.if_mine(act)
        if replies is False:
            raise FeedBusy(f"feed {self.name}: lost its lease to {shard.lease.holder()}; stopped")
        self.renewed = time.monotonic()
        return list(replies)

    # -------------------------------------------------------- Redis

    def read(self) -> dict[str, str]:
        """The feed's hash (shard 0's), with the counts summed over the shards."""
        self.counts = Counts()
        self.stored = [self._read(shard) for shard in self.shards]
        home = self.stored[0]
        self.sequence = int(home.get("through") or 0) if len(self.shards) > 1 else self.counts.fed
        return home

    def _read(self, shard: FeedShard) -> dict[str, str]:
        with shard.part.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(shard.key)
            pipe.zcard(shard.jobs_key)
            stored, outstanding = pipe.execute()
        self.counts.fed += int(stored.get("fed") or 0)
        self.counts.done += int(stored.get("done") or 0)
        self.counts.failed += int(stored.get("failed") or 0)
        self.counts.outstanding += outstanding
        return dict(stored)

    def resume(self, now: float) -> dict[str, str]:
        """read(), after putting the last batch's items in on the shards that
        did not get them (its feeder was stopped between shards)."""
        home = self.read()
        through = self.sequence
        behind = [shard for shard, stored in zip(self.shards, self.stored, strict=True)
                  if shard.index and int(stored.get("through") or 0) < through]
        if not behind:
            return home
        record = json.loads(self.home.part.client.get(self.home.batch_key) or "null")
        if record is None or record["through"] != through:
            log.warning("feed %s: shards %s are behind shard 0 (item %d) and its last batch is not recorded",
                        self.name, [shard.index for shard in behind], through)
            return home
        log.info("feed %s: putting the last batch (through item %d) in on shard(s) %s too",
                 self.name, through, ", ".join(str(shard.index) for shard in behind))
        items = [(Fed(jobid, data, None), number) for jobid, data, number in record["items"]]
        errors = [error for shard in behind
                  for error in self._put(shard, [item for item in items if self.shard_of(item[0].jobid) == shard.index],
                                         {"through": through, "updated": repr(now)})]
        self._refused(errors)
        return self.read()

    def start(self, started: dict[str, Any]) -> None:
        """Write ``started`` into the feed's hash (shard 0's)."""
        self.fenced(self.home, lambda pipe: (pipe.hset(self.home.key, mapping=started),
                                             pipe.sadd(self.home.part.keys.feeds, self.name)))

    def poll(self, now: float, most: int, rate: float) -> tuple[int, int, int, bool]:
        """feed_done.lua on each shard: count (and remove) the feed's jobs
        that ended. Outstanding, done and failed (by this call) summed, and
        whether a shard found as many ended as it looked at (look again)."""
        outstanding = done = failed = 0
        full = False
        for shard in self.shards:
            left, ended, lost = shard.part.scripts.run("feed_done", now, [shard.key, shard.jobs_key],
                                                        [most, 2 * most + 200, f"{rate:.3f}"])
            outstanding, done, failed = outstanding + left, done + ended, failed + lost
            full = full or ended + lost >= most
        self.counts.done += done
        self.counts.failed += failed
        self.counts.outstanding = outstanding
        return outstanding, done, failed, full

    def commit(self, batch: list[Fed], exhausted: bool, now: float) -> None:
        """Put ``batch`` in with the checkpoint after it: one fenced
        transaction per shard, shard 0's first (see feed.py)."""
        first = self.sequence
        numbered = [(fed, first + i) for i, fed in enumerate(batch)]
        home: dict[str, Any] = {"exhausted": int(exhausted), "updated": repr(now)}
        if batch:
            home["cursor"] = json.dumps(batch[-1].cursor, separators=(",", ":"))
        if len(self.shards) == 1:
            self._refused(self._put(self.home, numbered, home))
        else:
            through = first + len(batch)
            by_shard = self._by_shard(numbered)
            record = json.dumps({"through": through, "items": [[fed.jobid, fed.data, number]
                                                               for index, items in by_shard.items() if index
                                                               for fed, number in items]}, separators=(",", ":"))
            errors = self._put(self.home, by_shard.get(0, []), {**home, "through": through}, record)
            for shard in self.shards[1:]:
                errors += self._put(shard, by_shard.get(shard.index, []), {"through": through, "updated": repr(now)})
            self._refused(errors)
        self.sequence = first + len(batch)
        self.counts.fed += len(batch)
        self.counts.outstanding += len(batch)

    def _by_shard(self, numbered: Iterable[tuple[Fed, int]]) -> dict[int, list[tuple[Fed, int]]]:
        grouped: dict[int, list[tuple[Fed, int]]] = {}
        for item in numbered:
            grouped.setdefault(self.shard_of(item[0].jobid), []).append(item)
        return grouped

    def _put(self, shard: FeedShard, items: Sequence[tuple[Fed, int]], fields: dict[str, Any],
             record: str | None = None) -> list[tuple[str, Exception]]:
        """One fenced transaction on ``shard``: its ``items``' set.lua calls
        (each a one-off job, schedule NOW), their ids added to its
        outstanding jobs (scored by their number), its count fed and
        ``fields``, and (shard 0, with shards) ``record``, the batch's items
        of the other shards. The jobs its scripts refused."""
        queued: Any = None

        def act(pipe: Any) -> None:
            nonlocal queued
            queued = shard.part.queue_alike(pipe, ((fed.jobid, None, fed.data) for fed, _ in items), "NOW")
            if queued.refused:  # every item was checked (check_item): not expected
                jobid, error = next(iter(queued.refused.items()))
                raise SourceFailed(f"feed {self.name}: {jobid} refused: {error}")
            if items:
                pipe.zadd(shard.jobs_key, {fed.jobid: number for fed, number in items})
            pipe.hincrby(shard.key, "fed", len(items))
            pipe.hset(shard.key, mapping=fields)
            if record is not None:
                pipe.set(shard.batch_key, record)
            pipe.sadd(shard.part.keys.feeds, self.name)

        replies = self.fenced(shard, act)
        return [(jobid, reply) for jobid, reply in queued.results(replies).items() if isinstance(reply, Exception)]

    def _refused(self, errors: list[tuple[str, Exception]]) -> None:
        if errors:
            jobid, error = errors[0]
            raise SourceFailed(f"feed {self.name}: {len(errors)} job(s) refused, the first {jobid}: {error}")
