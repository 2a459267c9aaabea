"""The worker pool: one supervisor process and one child process per slot.

Each child claims a job, runs work(), then ends the run and claims the next
job in one round trip, on its own Redis connection: the supervisor is not
on the path of a job, so slots run in parallel and each job costs one round
trip. The supervisor watches the children through shared memory (see
slots.py): it renews the leases of long jobs from its own process, so a job
that holds the GIL for minutes (a C extension) cannot starve them; it kills
a child that overruns its job's timeout rather than leave the job running
beside its own retry; and it ends the run of a child that died and forks a
new one. Each slot holds at most the one job it runs: no prefetch.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis

from .keys import Keys
from .records import encode_local_room, error_record
from .resources import LOCAL_PREFIX, parse_amounts
from .roundrobin import Lease, RoundRobin, StopWork, UnsetJob
from .scripts import Scripts, subscribe
from .slots import Child, LocalLock, Running, SlotBoard, Zygote
from .states import Outcome, parse_status, place_after_run

log = logging.getLogger(__name__)

LEASE_SECONDS = 15.0  # a running job's lease outlives its last heartbeat by this much
GRACE_SECONDS = 2.0  # past a timeout: time for the supervisor to kill the job and report
IDLE_RECHECK_SECONDS = 5.0  # an idle slot looks at its queues this often without a wake-up
POLL_SECONDS = 0.5  # how often blocked waits look at the stop flags
MAX_BACKOFF_SECONDS = 5.0
QUICK_DEATH_SECONDS = 1.0  # a child dying younger than this is replaced after a backoff

# Notes a child sends its supervisor (one byte each).
NOTE_HALT = b"H"  # a claim found HALT: stop the pool
NOTE_FREED = b"F"  # a run gave back worker-local amounts: wake the idle slots


def run_work(worker: RoundRobin, lease: Lease) -> tuple[Outcome, str]:
    """Run one job's work(); returns its outcome and the traceback of a failure."""
    worker.lease = lease
    try:
        result = worker.work(lease.jobid)
        backoff = result if isinstance(result, int) and not isinstance(result, bool) else None
        return Outcome("ok", backoff), ""
    except StopWork:
        return Outcome("stop"), ""
    except UnsetJob:
        return Outcome("unset"), ""
    except Exception as exc:  # any failure of the job is reported, not fatal
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        return Outcome("error", error=error), traceback.format_exc()[-4000:]
    finally:
        worker.lease = None


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


class WorkerPool:
    """Run ``concurrency`` slots; stop on HALT, SIGTERM or SIGINT (a second
    signal kills running jobs)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        worker: RoundRobin,
        *,
        concurrency: int = 1,
        default_timeout: float = 10.0,
        lease_seconds: float = LEASE_SECONDS,
        resources: dict[str, int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client = client
        self.keys = keys
        self.scripts = Scripts(client, keys)
        # Worker-local resources (cpu_cores=16 ...): the pool counts them
        # itself from what its slots hold, and tells each claim how much is
        # free; claims that count them take a lock shared by the children.
        self.local_capacity = {f"{LOCAL_PREFIX}{name}": amount for name, amount in (resources or {}).items()}
        self.local_lock = LocalLock() if self.local_capacity else None
        self.worker = worker
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.queue_names = worker.queue_names()
        if not self.queue_names:
            raise ValueError("the worker names no queues (e.g. RoundRobin('A:B'))")
        self.timeouts = {
            name: float(worker.timeout(name) or default_timeout) for name in set(self.queue_names)
        }
        # What a claim passes per queue: its key; its name, timeout and the
        # seconds until the lease's first deadline.
        self.queue_keys = {name: keys.queue(name) for name in self.timeouts}
        self.queue_specs = {
            name: [name, timeout, min(timeout, lease_seconds) + GRACE_SECONDS]
            for name, timeout in self.timeouts.items()
        }
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.board = SlotBoard(concurrency)
        self.forced = threading.Event()
        self.done = threading.Event()
        self.children: dict[int, Child] = {}
        self.control_seen = ""
        # In a slot's child: its own connection (made on first use, inside
        # the slot's retry loop) and its channel to the supervisor.
        self.slot_connection: redis.connection.AbstractConnection | None = None
        self.channel: socket.socket | None = None

    @property
    def jobs_done(self) -> int:
        """Runs ended so far, by every slot."""
        return self.board.runs_ended()

    @property
    def stopping(self) -> bool:
        return self.board.stopping

    @property
    def local_used(self) -> dict[str, int]:
        """Worker-local amounts held by this pool's running jobs."""
        held = self.board.local_held()
        return {name: held.get(name, 0) for name in self.local_capacity}

    # -- signals and wake-ups (the supervisor) ---------------------------------

    def stop(self, *_: Any) -> None:
        """A signal. First: finish running jobs, claim no more. Second: kill them."""
        if self.board.stopping:
            log.warning("stopping now: killing the running jobs")
            self.forced.set()
        else:
            log.info("stopping after the running jobs (the same signal again kills them)")
        self.halt()

    def halt(self) -> None:
        """Finish running jobs, claim no more (HALT; the same again changes nothing)."""
        self.board.stop()
        self.kick()

    def kick(self) -> None:
        """Wake the idle slots: they look at their queues."""
        for child in list(self.children.values()):
            child.wake()

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        """Wake idle slots when a job enters one of their queues, and stop on HALT."""
        backoff = 0.1
        while not self.done.is_set():
            try:
                message = pubsub.get_message(timeout=POLL_SECONDS)
                backoff = 0.1
            except redis.RedisError as exc:
                log.warning("pub/sub connection lost (%s); retrying in %.1fs", exc, backoff)
                self.done.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                self.kick()  # messages may have been missed: look at the queues
                continue
            if message and message["type"] == "message":
                if message["channel"] == self.keys.control and self._halts(message["data"]):
                    log.info("HALT received")
                    self.halt()
                self.kick()

    def _halts(self, control: str | None) -> bool:
        return bool(control) and control != self.control_seen and control.startswith("HALT")

    def _note(self, note: bytes) -> None:
        """Tell the supervisor (from a slot's child), or act on it (elsewhere)."""
        if self.channel is None:
            if note == NOTE_HALT:
                self.halt()
            else:
                self.kick()
            return
        try:
            self.channel.send(note)
        except OSError:  # the supervisor is gone: this process dies with it
            pass

    # -- the claim / finish round trips ----------------------------------------

    def _claim_part(
        self, rotation: Rotation, token: str, worker_id: str, freed: dict[str, int]
    ) -> tuple[list[str], list[Any], list[tuple[int, str]]]:
        """KEYS and ARGV of a claim (claim() in lib.lua), and the queue order
        tried. ``freed``: local amounts the same script releases first."""
        order = rotation.order()
        keys = [self.queue_keys[name] for _, name in order]
        held = self.board.local_held() if self.local_capacity else {}
        free = {
            name: capacity - held.get(name, 0) + freed.get(name, 0)
            for name, capacity in self.local_capacity.items()
        }
        args: list[Any] = [token, worker_id, self.control_seen, encode_local_room(free, self.local_capacity)]
        for _, name in order:
            args += self.queue_specs[name]
        return keys, args, order

    def _job_from(
        self, reply: list[Any], order: list[tuple[int, str]], rotation: Rotation, token: str, worker_id: str, now: float
    ) -> Running | None:
        if reply[0] == "HALT":
            if self._halts(reply[1]):
                log.info("HALT found")
                self.board.stop()
                self._note(NOTE_HALT)
            return None
        if reply[0] != "JOB":
            return None
        _, jobid, index, schedule, status, needs = reply
        position, queue = order[int(index)]
        rotation.served(position)
        event, stamp = parse_status(status) if status else ("", now)
        lease = Lease(jobid, token, queue, worker_id, now, self.timeouts[queue])
        local = {name: amount for name, amount in parse_amounts(needs).items() if name in self.local_capacity} \
            if needs and self.local_capacity else {}
        return Running(lease, schedule, stamp if event == "ENQ" else now, now, local)

    def _connection(self) -> redis.connection.AbstractConnection | None:
        """In a slot's child, its own connection, used directly (nothing
        inherited from the supervisor is used); None (the pool's client) elsewhere."""
        if self.channel is None:
            return None
        if self.slot_connection is None:
            pool = self.client.connection_pool
            self.slot_connection = pool.connection_class(**pool.connection_kwargs)
        return self.slot_connection

    def _settle(self, job: Running | None, outcome: Outcome | None, trace: str,
                rotation: Rotation | None, worker_id: str, slot: int) -> tuple[str | None, Running | None]:
        """One round trip: end ``job``'s run (if any) and, with a rotation, claim
        the next job. Returns how the run ended (finish() in lib.lua) and the
        job claimed; the slot's record on the board follows."""
        done = None
        now = self.clock()
        token = os.urandom(8).hex()
        keys: list[str] = []
        args: list[Any] = []
        freed: dict[str, int] = {}
        if job is not None and outcome is not None:
            lease = job.lease
            home = self.worker.queue_for(lease.jobid)
            placement = place_after_run(job.schedule, outcome, now, job.enqueued_at)
            error = error_record(placement.status, outcome.error, worker_id, now, trace) if outcome.error else ""
            keys.append(self.keys.queue(home))
            args += [lease.jobid, lease.token, *placement.script_args(), error, self.keys.queue_channel(home)]
            freed = job.local_needs
        order: list[tuple[int, str]] = []
        if rotation is not None:
            claim_keys, claim_args, order = self._claim_part(rotation, token, worker_id, freed)
            keys += claim_keys
            args += claim_args
        connection = self._connection()
        if job is None:
            reply = self.scripts.run("claim", now, keys, args, client=connection)
        else:
            done, reply = self.scripts.run("finish", now, keys, args, client=connection)
            if done == "STALE":
                log.warning("job %s: lease lost before it ended; its outcome is dropped", job.lease.jobid)
        claimed = None
        if rotation is not None:
            while reply[0] == "MORE":  # the claim parked many jobs: look again (a loop: there may be thousands)
                now = self.clock()
                claim_keys, claim_args, order = self._claim_part(rotation, token, worker_id, {})
                reply = self.scripts.run("claim", now, claim_keys, claim_args, client=connection)
            claimed = self._job_from(reply, order, rotation, token, worker_id, now)
        self.board.replace(slot, job, claimed)
        if freed:
            self._note(NOTE_FREED)  # idle slots may have room now
        return done, claimed

    def settle(self, job: Running | None, outcome: Outcome | None, trace: str,
               rotation: Rotation | None, worker_id: str, slot: int = 0) -> tuple[str | None, Running | None]:
        """End a run and/or claim, holding the local-resource lock if this pool has one."""
        if self.local_lock is None:
            return self._settle(job, outcome, trace, rotation, worker_id, slot)
        with self.local_lock:
            return self._settle(job, outcome, trace, rotation, worker_id, slot)

    def claim(self, rotation: Rotation, worker_id: str, slot: int = 0) -> Running | None:
        """Claim one job (one round trip)."""
        return self.settle(None, None, "", rotation, worker_id, slot)[1]

    def finish(
        self, job: Running, outcome: Outcome, trace: str, rotation: Rotation | None, worker_id: str, slot: int = 0
    ) -> tuple[str | None, Running | None]:
        """End ``job``'s run; with a rotation, claim the next job in the same round trip."""
        return self.settle(job, outcome, trace, rotation, worker_id, slot)

    # -- a slot's child ----------------------------------------------------------

    def _wait_for_work(self) -> None:
        """Block until the supervisor wakes this slot, or IDLE_RECHECK_SECONDS."""
        assert self.channel is not None
        select.select([self.channel], [], [], IDLE_RECHECK_SECONDS)

    def _drain_wake_ups(self) -> None:
        """Forget the wake-ups so far: the claim that follows sees what they announced."""
        assert self.channel is not None
        try:
            while self.channel.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def run_slot(self, index: int, channel: socket.socket) -> None:
        """The life of slot ``index``'s child: claim, work, end the run and
        claim the next, until the pool stops."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
        self.channel = channel
        channel.setblocking(False)
        worker_id = f"{self.identity}:{index}"
        rotation = Rotation(self.queue_names)
        job: Running | None = None
        finished: tuple[Outcome, str] | None = None
        retry_in = 0.0  # seconds to wait after a Redis error; 0 while all is well
        try:
            while True:
                try:
                    if finished is not None and job is not None:
                        # After an error, a script may have run without its reply
                        # reaching us: end the run alone, so no claim is lost with it.
                        fused = None if self.board.stopping or retry_in else rotation
                        _, job = self.finish(job, *finished, fused, worker_id, index)
                        finished = None
                    elif self.board.stopping:
                        return
                    else:
                        self._drain_wake_ups()
                        job = self.claim(rotation, worker_id, index)
                    retry_in = 0.0
                except Exception as exc:  # Redis down, or a bug: log, back off, try again
                    retry_in = min(retry_in * 2 or 0.1, MAX_BACKOFF_SECONDS)
                    if isinstance(exc, redis.RedisError):
                        log.warning("slot %d: Redis error (%s); retrying in %.1fs", index, exc, retry_in)
                    else:
                        log.exception("slot %d: unexpected error; retrying in %.1fs", index, retry_in)
                    time.sleep(retry_in)
                    continue
                if job is None:
                    if not self.board.stopping:
                        self._wait_for_work()
                    continue
                finished = run_work(self.worker, job.lease)
                self.board.count_run(index)  # counted before the script that ends it
        finally:
            if self.slot_connection is not None:
                self.slot_connection.disconnect()

    # -- the supervisor ------------------------------------------------------------

    def _end_runs_of_dead_child(self, index: int, why: str, timed_out: str | None) -> None:
        """End the runs a dead child left on the board (a retry loop: Redis may be down)."""
        backoff = 0.1
        while runs := self.board.runs(index):
            run = runs[0]
            reason = why if timed_out in (None, run.lease.token) else "killed: the slot's previous job timed out"
            try:
                done, _ = self.finish(run, Outcome("expired", error=reason), "", None, run.lease.worker, index)
            except redis.RedisError as exc:
                log.warning("slot %d: Redis error (%s) ending %s; retrying in %.1fs", index, exc, run.lease.jobid, backoff)
                if self.done.wait(backoff):
                    return
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            if done != "STALE":
                log.warning("job %s: %s", run.lease.jobid, reason)
            self.board.count_run(index)

    def _supervise(self, index: int, child: Child) -> tuple[str, str | None]:
        """Watch slot ``index``'s child until it ends. Returns why it ended
        and, if it was killed for a timeout, the token of that run."""
        killed: tuple[str, str | None] | None = None
        while True:
            runs = self.board.runs(index)
            now = self.clock()
            deadline = min((run.lease.since + run.lease.timeout for run in runs), default=None)
            if killed is None:
                if self.forced.is_set():
                    killed = ("killed: stopped by force", None)
                    child.kill()
                elif deadline is not None and now >= deadline:
                    late = min(runs, key=lambda run: run.lease.since + run.lease.timeout)
                    killed = (f"killed: timed out after {late.lease.timeout:g}s", late.lease.token)
                    child.kill()
            wait = POLL_SECONDS if deadline is None or killed else min(POLL_SECONDS, deadline - now)
            notes, ended = child.wait(wait)
            if NOTE_HALT in notes:
                self.halt()
            elif NOTE_FREED in notes:
                self.kick()
            if ended:
                return killed or (self._death(index, child.pid), None)

    def _death(self, index: int, pid: int) -> str:
        code = self.board.exit_code(index, pid)
        if code is None:
            return "worker process died"
        if code < 0:
            return f"worker process died (killed by signal {-code}: {signal.Signals(-code).name})"
        return f"worker process died (exit code {code})"

    def _watch(self, index: int) -> None:
        """Keep slot ``index`` running a child until the pool stops."""
        backoff = 0.0
        while not self.board.stopping:
            try:
                child = self.zygote.spawn(index)
            except OSError as exc:
                backoff = min(backoff * 2 or 0.1, MAX_BACKOFF_SECONDS)
                log.error("slot %d: cannot start a worker process (%s); retrying in %.1fs", index, exc, backoff)
                if self.done.wait(backoff):
                    return
                continue
            self.children[index] = child
            born = time.monotonic()
            try:
                why, timed_out = self._supervise(index, child)
            finally:
                del self.children[index]
                child.close()
            if self.board.runs(index):
                self._end_runs_of_dead_child(index, why, timed_out)
                self.kick()  # what it held is free again
            if self.board.stopping:
                return
            log.warning("slot %d: worker process %d ended (%s); replaced", index, child.pid, why)
            backoff = min(backoff * 2 or 0.1, MAX_BACKOFF_SECONDS) if time.monotonic() - born < QUICK_DEATH_SECONDS else 0.0
            if backoff and self.done.wait(backoff):
                return

    def _heartbeat(self) -> None:
        """Renew the leases of jobs that run longer than a third of a lease,
        up to their timeout. A lease's deadline is renewed_at + lease + grace."""
        interval = self.lease_seconds / 3
        renewed: dict[str, float] = {}  # token -> when this supervisor last renewed it
        while not self.done.wait(min(interval, POLL_SECONDS * 4)):
            now = self.clock()
            beats: list[Any] = []
            running = self.board.all_runs()
            renewed = {run.lease.token: renewed.get(run.lease.token, run.renewed_at) for run in running}
            for run in running:
                lease = run.lease
                renewed_at = renewed[lease.token]
                cap = lease.since + lease.timeout + GRACE_SECONDS  # killed by then anyway
                # A lease already reaching the job's timeout needs no renewal:
                # jobs that fit in one lease cost no heartbeat traffic at all.
                if now - renewed_at >= interval and renewed_at + self.lease_seconds + GRACE_SECONDS < cap:
                    beats += [lease.jobid, lease.token, repr(min(now + self.lease_seconds + GRACE_SECONDS, cap))]
                    renewed[lease.token] = now
            if not beats:
                continue
            try:
                lost = self.scripts.run("renew", now, [], beats)
            except redis.RedisError as exc:
                log.warning("heartbeat failed (%s)", exc)
                continue
            for jobid in lost:
                log.warning("job %s: lease lost (reaped or unset) while it runs", jobid)

    def run(self) -> None:
        """Work until HALT or a signal."""
        self.control_seen = self.client.get(self.keys.control) or ""
        # Forked while this is still the process's only thread (see slots.py).
        self.zygote = Zygote(self.run_slot, self.board.record_exit)
        channels = [self.keys.queue_channel(name) for name in set(self.queue_names)]
        # Subscribed before the first claim, so no wake-up can fall in between.
        pubsub = subscribe(self.client, [self.keys.control, *channels])
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        threads = [threading.Thread(target=self._listen, args=(pubsub,), daemon=True, name="redbike-listen")]
        threads.append(threading.Thread(target=self._heartbeat, daemon=True, name="redbike-heartbeat"))
        watchers = [threading.Thread(target=self._watch, args=(i,), name=f"redbike-slot-{i}") for i in range(self.concurrency)]
        for thread in threads + watchers:
            thread.start()
        log.info("worker %s: %d slot(s) on queues %s", self.identity, self.concurrency, ":".join(self.queue_names))
        try:
            for watcher in watchers:
                while watcher.is_alive():
                    watcher.join(POLL_SECONDS)
        finally:
            self.done.set()
            for thread in threads:
                thread.join()
            pubsub.close()
            self.zygote.close()
            if self.local_lock is not None:
                self.local_lock.remove()
        log.info("worker %s stopped after %d job(s)", self.identity, self.jobs_done)
