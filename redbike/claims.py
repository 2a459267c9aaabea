"""The claim/finish protocol client: a slot's round trips to Redis.

A claim (claim.lua) leases the first job found in a slot's queues; a finish
(finish.lua) ends a run and, in the same round trip, claims the next job.
This module builds their KEYS and ARGV, runs the script on the slot's own
connection, turns the reply into a Running job and keeps the slot's record
on the board: one run per slot at most. What the reply meant for the pool
(a HALT, worker-local amounts given back) is returned to the caller, which
acts on it in its own process.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import redis

from . import stats
from .keys import Keys
from .names import check_queue
from .occurrences import Retry
from .records import (
    MORE,
    Claimed,
    ClaimReply,
    Halt,
    decode_claim,
    decode_finish,
    encode_local_room,
    error_record,
    occurrence_of,
)
from .resources import LOCAL_PREFIX
from .roundrobin import Lease, RoundRobin
from .scripts import Retention, Scripts
from .shards import Shards
from .slots import LocalLock, Running, SlotBoard
from .states import Outcome, Placement, place_after_run

log = logging.getLogger(__name__)

LEASE_LOST = "lease lost before it ended; its outcome is dropped"  # why a finish was STALE
LEASE_SECONDS = 15.0  # a running job's lease outlives its last heartbeat by this much
GRACE_SECONDS = 2.0  # past a timeout: time for the supervisor to kill the job and report
MAX_TIMEOUT = 366 * 86400.0  # a job may run up to a year
MIN_TIMEOUT = 0.001  # a millisecond: a claim passes a timeout as its repr(), which has no exponent from here on

# A slot's connection: one of its own (a child's hot path), or None for the
# client the scripts were registered on (the supervisor, tests).
Connection = redis.connection.AbstractConnection | None


class Tokens:
    """Run tokens, 8 random bytes each in hex, read from the OS 64 at a
    time: one getrandom() call per 64 runs instead of one per run. Each is
    handed out once, even to threads taking them at the same time (a list
    iterator's next() is atomic); a forked child drops what it inherited,
    or it would hand out the tokens its parent does."""

    BATCH = 64
    _next: Callable[[], str]  # the next token; StopIteration when none is left

    def __init__(self) -> None:
        self.drop()
        os.register_at_fork(after_in_child=self.drop)

    def drop(self) -> None:
        none: list[str] = []
        self._next = iter(none).__next__

    def take(self) -> str:
        try:
            return self._next()
        except StopIteration:
            text = os.urandom(8 * self.BATCH).hex()
            self._next = iter([text[at : at + 16] for at in range(0, len(text), 16)]).__next__
            return self._next()


_tokens = Tokens()  # one per process: see Tokens


class Rotation:
    """The weighted round robin of one slot over the worker's queue names."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.cursor = 0
        self._orders = [self._order_from(cursor) for cursor in range(len(names))]

    def _order_from(self, cursor: int) -> list[tuple[int, str]]:
        seen: set[str] = set()
        order = []
        for step in range(len(self.names)):
            position = (cursor + step) % len(self.names)
            name = self.names[position]
            if name not in seen:
                seen.add(name)
                order.append((position, name))
        return order

    def order(self) -> list[tuple[int, str]]:
        """(position, name) of each distinct queue, from the cursor on."""
        return self._orders[self.cursor]

    def served(self, position: int) -> None:
        self.cursor = (position + 1) % len(self.names)


class Settled(NamedTuple):
    """What one round trip did."""

    done: str | None  # how the ended run's finish went (DONE, GONE, STALE: see LEASE_LOST); None if none ended
    claimed: Running | None  # the job claimed, if any
    halted: bool = False  # the claim found a HALT this pool had not seen: the pool stops
    freed: bool = False  # the ended run gave back worker-local amounts: idle slots may have room
    placed: Placement | None = None  # where the ended run's job went, if at a time (it may be a retry: events.retried)


class Space:
    """One shard's part of what a pool's claims pass: the shard's client,
    keys and scripts, its queues' key and channel names, and the control
    value seen on it at start (each shard has its own control key)."""

    def __init__(self, client: redis.Redis, keys: Keys, queue_names: Iterable[str], retention: Retention | None) -> None:
        self.client = client
        self.keys = keys
        self.scripts = Scripts(client, keys, retention)
        # What a claim passes per queue: its key (and a finish its channel), made once.
        self.queue_keys = {name: keys.queue(name) for name in queue_names}
        self.queue_channels = {name: keys.queue_channel(name) for name in queue_names}
        self.control_seen = ""


class Claims:
    """What every claim and finish of one pool passes (queues, timeouts,
    worker-local capacities; per shard its Space: keys, scripts, the control
    value seen at start), and the board its slots' records are kept on.
    ``slot()`` gives one slot's client of one shard."""

    def __init__(
        self,
        shards: Shards,
        worker: RoundRobin,
        board: SlotBoard,
        *,
        default_timeout: float,
        lease_seconds: float,
        resources: dict[str, int] | None,
        clock: Callable[[], float],
        retry: Retry | None = None,
        retention: Retention | None = None,
    ) -> None:
        self.worker = worker
        self.board = board
        self.clock = clock
        self.retry = retry or Retry()
        self.queue_names = [check_queue(name) for name in worker.queue_names()]
        if not self.queue_names:
            raise ValueError("the worker names no queues (e.g. RoundRobin('A:B'))")
        self.timeouts = {name: _timeout(worker, name, default_timeout) for name in set(self.queue_names)}
        self.spaces = [Space(client, keys, self.timeouts, retention) for client, keys in zip(shards.clients, shards.keys)]
        # What a claim passes per queue besides its key (see Space): its
        # name, timeout and the seconds until the lease's first deadline (as
        # text: repr() is how redis-py and hiredis send a float, so the bytes
        # are the same, and a float would be formatted again at every claim).
        self.queue_specs = {
            name: [name, repr(timeout), repr(min(timeout, lease_seconds) + GRACE_SECONDS)]
            for name, timeout in self.timeouts.items()
        }
        # Worker-local resources (cpu_cores=16 ...): the pool counts them
        # itself from what its slots hold, and tells each claim how much is
        # free; while the pool runs, claims that count them take a lock
        # shared by its processes (set by the pool: see WorkerPool.run).
        self.local_capacity = {f"{LOCAL_PREFIX}{name}": amount for name, amount in (resources or {}).items()}
        self.local_lock: LocalLock | None = None

    # Shard 0's scripts and control value: those of the one shard of a pool
    # without shards (tests drive such a pool through them).
    @property
    def scripts(self) -> Scripts:
        return self.spaces[0].scripts

    @property
    def control_seen(self) -> str:
        return self.spaces[0].control_seen

    @control_seen.setter
    def control_seen(self, value: str) -> None:
        self.spaces[0].control_seen = value

    def halts(self, control: str | None, shard: int = 0) -> bool:
        """Whether a control value read on ``shard`` is a HALT this pool has not seen there."""
        return bool(control) and control != self.spaces[shard].control_seen and str(control).startswith("HALT")

    def local_used(self) -> dict[str, int]:
        """Worker-local amounts held by the runs of every slot."""
        held = self.board.local_held()
        return {name: held.get(name, 0) for name in self.local_capacity}

    def slot(self, index: int, worker_id: str, connection: Connection = None, shard: int = 0) -> SlotClaims:
        """The claim/finish client of slot ``index`` on ``shard`` (its runs are leased to ``worker_id``)."""
        return SlotClaims(self, index, worker_id, connection, shard)


def _timeout(worker: RoundRobin, queue: str, default: float) -> float:
    """The seconds a job of ``queue`` may run: the worker's timeout() hook, else ``default``."""
    given = worker.timeout(queue)
    try:
        seconds = float(given or default)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and MIN_TIMEOUT <= seconds <= MAX_TIMEOUT):
        raise ValueError(f"bad timeout {given!r} for queue {queue}: seconds from {MIN_TIMEOUT:g} to {MAX_TIMEOUT:.0f}")
    return seconds


class SlotClaims:
    """One slot's claim/finish client on one shard: it holds at most one
    run, recorded on the board as the slot's record (a slot serving several
    shards has one per shard, see shardclaims.py, and one run in all)."""

    def __init__(self, claims: Claims, index: int, worker_id: str, connection: Connection, shard: int = 0) -> None:
        self.claims = claims
        self.space = claims.spaces[shard]
        self.shard = shard
        self.index = index
        self.worker_id = worker_id
        self.connection = connection
        self.tally = stats.Tally()  # the runs this slot ended on its shard, sent with a later finish there
        # The KEYS and per-queue ARGV of a claim, by cursor of the rotation
        # they were made for: the same at every turn, so made once each.
        self._turns: dict[int, tuple[list[str], list[Any]]] = {}
        self._turns_of: Rotation | None = None

    def claim(self, rotation: Rotation) -> Settled:
        """Claim one job (one round trip)."""
        return self._locked(None, None, "", rotation)

    def finish(self, job: Running, outcome: Outcome, trace: str, rotation: Rotation | None) -> Settled:
        """End ``job``'s run; with a rotation, claim the next job in the same round trip."""
        if self.claims.local_lock is None:  # a call less on every job's path
            return self._settle(job, outcome, trace, rotation)
        return self._locked(job, outcome, trace, rotation)

    def still_set(self, jobid: str) -> bool:
        """Whether ``jobid`` still has a schedule: one HEXISTS on the slot's
        connection (RoundRobin.still_set, asked by a run while it runs)."""
        if self.connection is None:
            return bool(self.space.client.hexists(self.space.keys.schedules, jobid))
        try:
            self.connection.send_command("HEXISTS", self.space.keys.schedules, jobid)
            return bool(self.connection.read_response())
        except (redis.ConnectionError, redis.TimeoutError):
            self.connection.disconnect()  # a reply may be half read: start afresh
            raise

    def flush_tally(self) -> None:
        """Send the runs counted and not sent yet (tally.lua): when the slot
        goes idle, so that they are not held back until its next finish."""
        text = self.tally.take(self.claims.clock(), force=True)
        if text:
            self.space.scripts.run("tally", self.claims.clock(), [], [text], client=self.connection)

    def _locked(self, job: Running | None, outcome: Outcome | None, trace: str,
                rotation: Rotation | None) -> Settled:
        """_settle(), holding the pool's lock where claims count worker-local amounts (see Claims)."""
        lock = self.claims.local_lock
        if lock is None:
            return self._settle(job, outcome, trace, rotation)
        with lock:
            return self._settle(job, outcome, trace, rotation)

    def _claim_part(self, rotation: Rotation, token: str, freed: dict[str, int]
                    ) -> tuple[list[str], list[Any], list[tuple[int, str]]]:
        """KEYS and ARGV of a claim (claim() in lib.lua), and the queue order
        tried. ``freed``: local amounts the same script releases first."""
        claims = self.claims
        order = rotation.order()
        if rotation is not self._turns_of:
            self._turns, self._turns_of = {}, rotation
        turn = self._turns.get(rotation.cursor)
        if turn is None:
            turn = self._turns[rotation.cursor] = (
                [self.space.queue_keys[name] for _, name in order],
                [value for _, name in order for value in claims.queue_specs[name]])
        room = ""  # a pool that declared no worker-local resource (encode_local_room of none)
        if claims.local_capacity:
            held = claims.board.local_held()
            free = {
                name: capacity - held.get(name, 0) + freed.get(name, 0)
                for name, capacity in claims.local_capacity.items()
            }
            room = encode_local_room(free, claims.local_capacity)
        return list(turn[0]), [token, self.worker_id, self.space.control_seen, room, *turn[1]], order

    def _job_from(self, reply: ClaimReply, order: list[tuple[int, str]], rotation: Rotation, token: str,
                  now: float) -> tuple[Running | None, bool]:
        """The job a claim's reply leased, and whether it found a new HALT."""
        if not isinstance(reply, Claimed):
            if isinstance(reply, Halt) and self.claims.halts(reply.control, self.shard):
                log.info("HALT found")
                self.claims.board.stop()
                return None, True
            return None, False
        position, queue = order[reply.queue_index]
        rotation.served(position)
        due, attempt = occurrence_of(reply.record, now)
        lease = Lease.claimed(reply.jobid, token, queue, self.worker_id, now, self.claims.timeouts[queue], due, attempt)
        capacity = self.claims.local_capacity
        local = {name: amount for name, amount in reply.needs.items() if name in capacity} if capacity else {}
        return Running(lease, reply.schedule, reply.record, now, local, reply.data, self.shard), False

    def _settle(self, job: Running | None, outcome: Outcome | None, trace: str,
                rotation: Rotation | None) -> Settled:
        """One round trip: end ``job``'s run (if any) and, with a rotation,
        claim the next job; the slot's record on the board follows."""
        claims, space = self.claims, self.space
        done = None
        now = claims.clock()
        token = _tokens.take()
        keys: list[str] = []
        args: list[Any] = []
        freed: dict[str, int] = {}
        placement = None
        if job is not None and outcome is not None:
            lease = job.lease
            home = claims.worker.queue_for(lease.jobid)
            placement = place_after_run(job.schedule, outcome, now, lambda: job.job, claims.retry)
            error = error_record(placement.status, outcome.error, self.worker_id, now, trace) if outcome.error else ""
            # A job goes back to one of the worker's queues (their names made once), unless queue_for() says otherwise.
            keys.append(space.queue_keys.get(home) or space.keys.queue(home))
            args += [lease.jobid, lease.token, placement.script_arg, error,
                     space.queue_channels.get(home) or space.keys.queue_channel(home),
                     str(placement.fires), self.tally.take(now, force=rotation is None)]
            freed = job.local_needs
        order: list[tuple[int, str]] = []
        if rotation is not None:
            claim_keys, claim_args, order = self._claim_part(rotation, token, freed)
            keys += claim_keys
            args += claim_args
        reply: ClaimReply
        if job is None:
            reply = decode_claim(space.scripts.run("claim", now, keys, args, client=self.connection))
        else:
            done, reply = decode_finish(space.scripts.run("finish", now, keys, args, client=self.connection))
        if job is not None and outcome is not None and placement is not None and done != "STALE":
            # Counted once ended (a stale run is the reaper's: counted expired there); sent with a later finish.
            self.tally.add(job.lease.queue, stats.outcome_of(outcome.kind, outcome.error, placement.status),
                           now - job.lease.since)
            if rotation is None:  # no claim follows (a stop, the supervisor ending a dead child's run): send now
                self.flush_tally()
        claimed, halted = None, False
        if rotation is not None:
            while reply == MORE:  # the claim parked many jobs: look again (a loop: there may be thousands)
                now = claims.clock()
                claim_keys, claim_args, order = self._claim_part(rotation, token, {})
                reply = decode_claim(space.scripts.run("claim", now, claim_keys, claim_args, client=self.connection))
            claimed, halted = self._job_from(reply, order, rotation, token, now)
        if job is not None or claimed is not None:
            claims.board.write(self.index, [claimed] if claimed is not None else [])
        # Only a placement at a time (T) can be a retry: a one-off's end makes no call to tell_retry().
        placed = placement if done == "DONE" and placement is not None and placement.kind == "T" else None
        return Settled(done, claimed, halted, bool(freed), placed)
