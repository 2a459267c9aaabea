"""A slot's claims over every shard of its pool (shards.py): one SlotClaims
per shard, and the order the slot tries the shards in.

A run lives on one shard: its finish goes there, and claims the next job
there in the same round trip (as with one shard: one round trip per job
while that shard has jobs waiting). Only when that finds nothing does the
slot try the other shards, one claim (one round trip) each, from the next
one on. A slot that was idle starts from the shard after the one it started
from last time (slots start on different shards), so idle slots spread
over the shards rather than all asking shard 0 first.

A shard that always has a job waiting (a CONTINUE job goes back into its
queue as its run ends, and the same round trip claims it again) would keep
a slot for ever, and the other shards' jobs would wait as long. So a slot
stays on one shard for a turn of SHARD_TURN_SECONDS at most: the first
finish after that ends its run alone and the slot claims from the next
shards on, the one it leaves last. That costs a round trip or so per shard
and turn (at most one per second), not per job.

A shard that cannot be reached (its primary lost, on a cluster) is passed
over, its outage logged, and the slot's next look asks every shard again:
the other shards' jobs go on running. Only when every shard asked fails
does the error reach the slot, which backs off as it does with one shard.

An idle slot woken because a job entered a queue of shard k (the
supervisor hears which: each shard has its queue channels) asks shard k
alone: its last look found the other shards empty, and a job entering one
of them wakes it again. Only a wake-up of another kind (worker-local amounts
freed, messages maybe missed, or none within the idle look's interval)
makes it ask every shard.

With one shard every call is exactly SlotClaims': the same commands and
round trips.
"""

from __future__ import annotations

import logging
import time
from typing import cast

import redis

from .claims import Claims, Connection, Rotation, Settled, SlotClaims
from .clients import DEFAULT_SOCKET_TIMEOUT
from .outage import Outage
from .slots import Running
from .states import Outcome

log = logging.getLogger(__name__)

SHARD_TURN_SECONDS = 1.0  # the longest a slot keeps claiming on one shard while the others may have jobs

# A wake-up note (one byte, supervisor to slot): WAKE_ALL (zygote.Child's
# default) says look at every shard; SHARD_NOTE + k, a job entered a queue
# of shard k (shards from SHARD_NOTE_LIMIT on are woken as all).
WAKE_ALL = b"W"
SHARD_NOTE = 0x80
SHARD_NOTE_LIMIT = 0xFF - SHARD_NOTE


def wake_note(shard: int | None) -> bytes:
    """The note that wakes a slot for ``shard`` (None: every shard)."""
    return WAKE_ALL if shard is None or shard >= SHARD_NOTE_LIMIT else bytes([SHARD_NOTE + shard])


def woken_shards(notes: bytes) -> set[int] | None:
    """The shards the wake-up ``notes`` a slot read name; None for every
    shard (a note for all, or none: the slot's own look)."""
    shards = set()
    for note in notes:
        if note < SHARD_NOTE:
            return None
        shards.add(note - SHARD_NOTE)
    return shards or None


def slot_connections(claims: Claims) -> list[redis.connection.AbstractConnection]:
    """A connection of its own for a slot's child on each shard, made like
    the client's own but used directly (see Slot); shards on one client (one
    server) share one: the slot sends one command at a time anyway."""
    made: dict[int, redis.connection.AbstractConnection] = {}
    connections = []
    for space in claims.spaces:
        connection = made.get(id(space.client))
        if connection is None:
            connection = made[id(space.client)] = _connection_of(space.client)
        connections.append(connection)
    return connections


def _connection_of(client: redis.Redis) -> redis.connection.AbstractConnection:
    pool = client.connection_pool
    settings = dict(pool.connection_kwargs)
    if settings.get("socket_timeout") == DEFAULT_SOCKET_TIMEOUT:
        # Without a timeout a socket read is one recv(), with one a poll()
        # before each send and recv: a tenth of a job's CPU. A dead peer is
        # still found: over TCP by keepalive and TCP_USER_TIMEOUT (see
        # config.py); a unix socket cannot be silently dropped.
        settings["socket_timeout"] = None
    return cast("redis.connection.AbstractConnection", pool.connection_class(**settings))


class SlotShards:
    """One slot's claim/finish clients, one per shard (``connections[k]``
    for shard k), each with its own rotation over the worker's queues."""

    def __init__(self, claims: Claims, index: int, worker_id: str, connections: list[Connection]) -> None:
        self.index = index
        self.shards: list[SlotClaims] = [claims.slot(index, worker_id, connection, shard)
                                         for shard, connection in enumerate(connections)]
        self.rotations = [Rotation(claims.queue_names) for _ in self.shards]
        self.count = len(self.shards)
        self.start = index % self.count  # the shard the next claim from idle starts with
        self.turn_ends = 0.0  # when the slot's turn on the shard of its run ends (time.monotonic)
        self.unsure = False  # a claim failed: the next claim asks every shard
        self.outages = [Outage(log, f"slot {index} (shard {shard})") for shard in range(self.count)]

    def claim(self, woken: set[int] | None = None) -> Settled:
        """Claim one job: from every shard (``woken``: those alone) in turn
        until one has a job or a HALT (one round trip per shard asked), from
        a shard that moves on by one at each call."""
        first = self.start
        if self.count == 1:
            return self._claim_on([0])
        if self.unsure:
            woken, self.unsure = None, False
        self.start = (first + 1) % self.count
        order = [(first + step) % self.count for step in range(self.count)]
        return self._claim_on([shard for shard in order if woken is None or shard in woken])

    def finish(self, job: Running, outcome: Outcome, trace: str, then_claim: bool) -> Settled:
        """End ``job``'s run on its shard; with ``then_claim``, claim the next
        job there in the same round trip, and if that finds none, on the
        other shards (one round trip each)."""
        shard = job.shard
        mine = self.shards[shard]
        if self.count == 1:
            return mine.finish(job, outcome, trace, self.rotations[0] if then_claim else None)
        turn_over = then_claim and time.monotonic() >= self.turn_ends  # the others' turn: this shard's last
        settled = mine.finish(job, outcome, trace, self.rotations[shard] if then_claim and not turn_over else None)
        if not then_claim or settled.claimed is not None or settled.halted:
            return settled
        try:
            # Leaving this shard: what the slot counted on it goes out now,
            # not with a finish there that may be long in coming.
            mine.flush_tally()
            others = [(shard + step) % self.count for step in range(1, self.count + 1 if turn_over else self.count)]
            other = self._claim_on(others)
        except redis.RedisError as exc:
            # The run is ended: never report it as unfinished. Idle now, the
            # slot asks again soon (a wake-up, or its idle look), and an
            # outage shows then, on its usual path.
            log.info("slot %d: no claim after a finish on shard %d (%s)", self.index, shard, exc)
            self.unsure = True
            return settled
        return settled._replace(claimed=other.claimed, halted=other.halted)

    def _claim_on(self, shards: list[int]) -> Settled:
        """Claim from ``shards`` in turn until one has a job or a HALT. With
        one shard an error goes up at once; with several, a shard that
        fails is passed over (see the module's doc) unless all asked fail."""
        if self.count == 1:
            return self.shards[0].claim(self.rotations[0])
        settled = Settled(None, None)
        failed: dict[int, redis.RedisError] = {}
        for shard in shards:
            try:
                settled = self.shards[shard].claim(self.rotations[shard])
            except redis.RedisError as exc:
                failed[shard] = exc
                continue
            self.outages[shard].recovered()
            if settled.claimed is not None:
                self.turn_ends = time.monotonic() + SHARD_TURN_SECONDS
                break
            if settled.halted:
                break
        if failed:
            self.unsure = True
            if len(failed) == len(shards):
                raise next(iter(failed.values()))
            for shard, error in failed.items():
                self.outages[shard].failed(error)
        return settled

    def still_set(self, job: Running) -> bool:
        """Whether ``job`` still has a schedule (asked on its shard)."""
        return self.shards[job.shard].still_set(job.lease.jobid)

    def flush_tally(self) -> None:
        """Send what the slot counted on each shard and did not send yet."""
        for shard in self.shards:
            shard.flush_tally()
