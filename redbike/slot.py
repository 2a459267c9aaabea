"""A slot's child process: claim a job, run work(), end the run and claim
the next in one round trip, on the child's own Redis connection, until the
pool stops (with shards: on the run's shard, see shardclaims.py). The
supervisor is not on this path (see supervisor.py); the child tells it what
it must act on with one-byte notes.
"""

from __future__ import annotations

import logging
import mmap
import select
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable

import redis

from .claims import LEASE_LOST, Claims, Settled
from .events import Subscriber, tell_retry
from .outage import Outage
from .records import DataError, decode_data
from .roundrobin import Lease, RoundRobin, StopWork, UnsetJob
from .shardclaims import SlotShards, slot_connections, woken_shards
from .slots import Running
from .states import OK, Outcome

log = logging.getLogger(__name__)

IDLE_RECHECK_SECONDS = 6.0  # an idle slot looks at its queues this often without a wake-up (5 commands: with the registry's refresh, under 1 command/s)
MAX_BACKOFF_SECONDS = 5.0
MAX_BACKOFF_RETURNED = 366 * 86400  # the longest backoff work() may ask for: a year

# Notes a child sends its supervisor (one byte each).
NOTE_HALT = b"H"  # a claim found HALT: stop the pool
NOTE_FREED = b"F"  # a run gave back worker-local amounts: wake the idle slots


OUTCOME_BYTES = 1 << 15  # per slot: a token, an outcome, an error line and a traceback (4000 characters)
_LENGTH = struct.Struct("<I")
_ROOM = OUTCOME_BYTES - _LENGTH.size  # the most of a record that fits after its length
_OK_TAIL = f"\0{OK.kind}\0\0\0".encode()  # after the token: an OK outcome has no backoff, error or trace


class Outcomes:
    """How each slot's current run ended, as its child saw it, in anonymous
    shared memory that the children inherit. The child writes it as soon as
    work() returns, before it reports the run to Redis: if the child is then
    killed (a forced stop) while Redis is down or slow, the supervisor still
    knows that the run completed, and how, and ends it as what it was.
    Written by the slot's child only, read by the supervisor once that
    child has ended (so no reader races a writer)."""

    def __init__(self, slots: int) -> None:
        self.memory = mmap.mmap(-1, slots * OUTCOME_BYTES)

    def write(self, slot: int, token: str, outcome: Outcome, trace: str) -> None:
        if outcome is OK:  # most runs: a token of hex digits and the same tail
            data = token.encode() + _OK_TAIL
        else:
            backoff = "" if outcome.backoff is None else repr(outcome.backoff)
            error = outcome.error.replace("\0", " ") if outcome.error else ""
            data = f"{token}\0{outcome.kind}\0{backoff}\0{error}\0{trace}".encode(errors="replace")[:_ROOM]
        base = slot * OUTCOME_BYTES
        # No record while it is written: a child killed meanwhile leaves none.
        _LENGTH.pack_into(self.memory, base, 0)
        self.memory[base + _LENGTH.size : base + _LENGTH.size + len(data)] = data
        _LENGTH.pack_into(self.memory, base, len(data))

    def read(self, slot: int, token: str) -> tuple[Outcome, str] | None:
        """The outcome and traceback recorded for run ``token`` of ``slot``, if any."""
        base = slot * OUTCOME_BYTES
        length = _LENGTH.unpack_from(self.memory, base)[0]
        data = self.memory[base + _LENGTH.size : base + _LENGTH.size + length].decode(errors="replace")
        fields = data.split("\0", 4)
        if len(fields) != 5 or fields[0] != token:
            return None
        _, kind, backoff, error, trace = fields
        return Outcome(kind, float(backoff) if backoff else None, error), trace


def backoff_of(jobid: str, result: object) -> int | None:
    """The backoff a work() result asks for: an integer of seconds, from 0 to
    MAX_BACKOFF_RETURNED; one outside is logged and clamped to that range
    (a negative one: no backoff; a huge one would not even fit a float)."""
    if not isinstance(result, int) or isinstance(result, bool):
        return None
    if 0 <= result <= MAX_BACKOFF_RETURNED:
        return result
    clamped = 0 if result < 0 else MAX_BACKOFF_RETURNED
    shown = str(result) if abs(result) < 10**12 else f"an integer of about {int(result.bit_length() * 0.30103)} digits"
    log.warning("job %s: work() returned %s, not a backoff of 0 to %d seconds; backing off %d s",
                jobid, shown, MAX_BACKOFF_RETURNED, clamped)
    return clamped


def run_work(worker: RoundRobin, lease: Lease, data: str = "",
             job_probe: Callable[[], bool] | None = None) -> tuple[Outcome, str]:
    """Run one job's work() (its payload, decoded, in ``worker.data``;
    ``job_probe`` as its still_set()); returns its outcome and the
    traceback of a failure."""
    worker.lease, worker.job_probe = lease, job_probe
    try:
        try:
            worker.data = decode_data(data) if data else None
        except ValueError:  # stored by another writer than redbike's set: the run fails, the slot goes on
            raise DataError(f"the job's stored data is not JSON: {data[:80]!r}") from None
        result = worker.work(lease.jobid)
        return (OK if result is None else Outcome("ok", backoff_of(lease.jobid, result))), ""
    except StopWork:
        return Outcome("stop"), ""
    except UnsetJob:
        return Outcome("unset"), ""
    except Exception as exc:  # noqa: BLE001 - any failure of the job is reported, not fatal
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        return Outcome("error", error=error), traceback.format_exc()[-4000:]
    finally:
        worker.lease = worker.job_probe = None
        worker.data = None


class Slot:
    """The life of one slot's child: claim, work, end the run and claim the
    next, until the pool stops."""

    def __init__(self, claims: Claims, events: Subscriber, outcomes: Outcomes, index: int, worker_id: str,
                 channel: socket.socket) -> None:
        self.index = index
        self.events = events
        self.outcomes = outcomes
        self.board = claims.board
        self.worker = claims.worker
        self.channel = channel
        # Its own connections (one per server its shards are on), used
        # directly (nothing inherited from the supervisor is used); each
        # connects on first use, inside the retry loop.
        self.connections = slot_connections(claims)
        self.connection = self.connections[0]  # shard 0's
        self.claims = SlotShards(claims, index, worker_id, list(self.connections))

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        self.channel.setblocking(False)
        job: Running | None = None
        finished: tuple[Outcome, str] | None = None
        retry_in = 0.0  # seconds to wait after a Redis error; 0 while all is well
        outage = Outage(log, f"slot {self.index}")
        try:
            while True:
                try:
                    if finished is not None and job is not None:
                        # After an error, a script may have run without its reply
                        # reaching us: end the run alone, so no claim is lost with it.
                        fused = not (self.board.stopping or retry_in)
                        settled = self.claims.finish(job, *finished, fused)
                        finished = None
                        if settled.done == "STALE":
                            self.events.expired(job.lease, LEASE_LOST)
                        if settled.placed is not None:  # only a run placed at a time may be retried: most make no call
                            tell_retry(self.events, job.lease, settled.placed)
                    elif self.board.stopping:
                        return
                    else:
                        notes = self._drain_wake_ups()
                        # After an error the last look may not have reached every shard: this one does.
                        settled = self.claims.claim(None if retry_in else woken_shards(notes))
                    job = settled.claimed
                    if job is None:  # idle now: what it counted goes out, not with a finish hours later
                        self.claims.flush_tally()
                        self.events.idle()
                    if settled.halted or settled.freed:
                        self._tell_supervisor(settled)
                    if retry_in:
                        outage.recovered()
                    retry_in = 0.0
                except Exception as exc:  # Redis down, or a bug: log, back off, try again
                    retry_in = min(retry_in * 2 or 0.1, MAX_BACKOFF_SECONDS)
                    if isinstance(exc, redis.RedisError):
                        outage.failed(exc, retry_in)
                    else:
                        log.exception("slot %d: unexpected error; retrying in %.1fs", self.index, retry_in)
                    time.sleep(retry_in)
                    continue
                if job is None:
                    if not self.board.stopping:
                        self._wait_for_work()
                    continue
                finished = self._run(job)
        finally:
            for connection in self.connections:
                connection.disconnect()

    def _run(self, job: Running) -> tuple[Outcome, str]:
        self.events.claimed(job.lease)
        started = time.monotonic()
        outcome, trace = run_work(self.worker, job.lease, job.data, lambda: self.claims.still_set(job))
        seconds = time.monotonic() - started
        self.outcomes.write(self.index, job.lease.token, outcome, trace)  # before Redis is asked anything
        self.board.count_run(self.index)  # counted as ended where its outcome is known (see Outcomes)
        if outcome.kind == "error":
            self.events.failed(job.lease, outcome, seconds, trace)
        else:
            self.events.finished(job.lease, outcome, seconds)
        return outcome, trace

    def _tell_supervisor(self, settled: Settled) -> None:
        if settled.halted:
            self._note(NOTE_HALT)
        elif settled.freed:
            self._note(NOTE_FREED)  # idle slots may have room now

    def _note(self, note: bytes) -> None:
        try:
            self.channel.send(note)
        except OSError:  # the supervisor is gone: this process dies with it
            pass

    def _wait_for_work(self) -> None:
        """Block until the supervisor wakes this slot, or IDLE_RECHECK_SECONDS."""
        select.select([self.channel], [], [], IDLE_RECHECK_SECONDS)

    def _drain_wake_ups(self) -> bytes:
        """Take the wake-ups so far (their notes: see shardclaims.wake_note):
        the claim that follows sees what they announced."""
        notes = b""
        try:
            while part := self.channel.recv(4096):
                notes += part
        except (BlockingIOError, InterruptedError):
            pass
        return notes
