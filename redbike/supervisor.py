"""The worker pool's supervisor: one process that keeps a child per slot.

Each child claims, runs and finishes its own jobs (see slot.py): the
supervisor is not on the path of a job. It watches the children through
shared memory (see slots.py): it renews the leases of long jobs from its own
process, so a job that holds the GIL for minutes (a C extension) cannot
starve them; it kills a child that overruns its job's timeout rather than
leave the job running beside its own retry; and it ends the run of a child
that died and forks a new one. It handles the signals, and wakes idle slots
when a job enters one of their queues. Each slot holds at most the one job
it runs: no prefetch.

One pool serves every shard of an installation (shards.py): each slot
claims from all of them (see shardclaims.py), each run is renewed and ended
on its own shard, and a HALT on any shard stops the pool.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import redis

from .claims import GRACE_SECONDS, LEASE_LOST, LEASE_SECONDS, Claims
from .events import Events, LogEvents, tell_retry
from .keys import Keys
from .occurrences import Retry
from .outage import Outage, retried
from .registry import REFRESH_SECONDS, Registration, slot_runs
from .roundrobin import RoundRobin
from .scripts import Retention, subscribe
from .shardclaims import wake_note
from .shards import Shards
from .slot import MAX_BACKOFF_SECONDS, NOTE_FREED, NOTE_HALT, Outcomes, Slot
from .slots import LocalLock, Running, SlotBoard
from .states import Outcome
from .titles import SlotTitles, set_title, slot_title
from .zygote import Child, Zygote

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often blocked waits look at the stop flags
QUICK_DEATH_SECONDS = 1.0  # a child dying younger than this is replaced after a backoff


LOST_ITS_LEASE = "lost its lease"


def _error_of(text: Any) -> dict[str, Any] | None:
    """A job's error record (JSON, see records.error_record), or None if it has none that reads."""
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def pid_of_worker(worker: str) -> int | None:
    """The pid in a lease's worker id, ``host:pid:slot`` (WorkerPool.worker_id), or None if it is not one."""
    parts = worker.rsplit(":", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit() else None


class Ending(NamedTuple):
    """Why a slot's child ended."""

    why: str  # for the run it concerns: how it ended
    token: str | None = None  # the run it was killed for (None: whichever run the slot held)
    cause: str = ""  # what that run did, said of another run the slot held by then


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
        events: Events | None = None,
        retry: Retry | None = None,
        retention: Retention | None = None,
        registry_seconds: float = REFRESH_SECONDS,
        shards: Shards | None = None,
    ) -> None:
        """``events``: where the pool reports what its jobs do (default: the log);
        subscribe to ``self.events`` before run(). ``registry_seconds``: how
        often the pool's registry entry is written while nothing changes
        (it expires after three times that). ``shards``: the job spaces the
        pool serves, all of them (``client`` and ``keys`` are then unused);
        None: the one of ``client`` and ``keys``."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.shards = shards if shards is not None else Shards(keys.prefix, [client])
        self.client = client if shards is None else shards.clients[0]
        self.keys = keys if shards is None else shards.keys[0]
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.board = SlotBoard(concurrency)
        self.outcomes = Outcomes(concurrency)
        self.claims = Claims(self.shards, worker, self.board, default_timeout=default_timeout,
                             lease_seconds=lease_seconds, resources=resources, clock=clock,
                             retry=retry, retention=retention)
        self.scripts = self.claims.scripts  # shard 0's
        self.queue_names = self.claims.queue_names
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.events = events if events is not None else Events(LogEvents())
        self.events.subscribe(SlotTitles())  # in the children: which job each slot runs
        # An entry on every shard, so that each shard's views see the pool,
        # all alike (the same identity): each shows all of the pool's slots
        # and runs, those of other shards too (each run says its shard), so
        # views that merge the shards may keep any one of them.
        self.registrations = [
            Registration(shard_client, shard_keys, "worker", self.identity, clock=clock, queues=self.queue_names,
                         slots=concurrency, resources=resources, refresh_seconds=registry_seconds)
            for shard_client, shard_keys in zip(self.shards.clients, self.shards.keys)]
        self.registration = self.registrations[0]
        # Each shard's control channel and queue channels, to the shard they are of.
        self.controls = {space.keys.control: shard for shard, space in enumerate(self.claims.spaces)}
        self.queue_shards = {channel: shard for shard, space in enumerate(self.claims.spaces)
                             for channel in space.queue_channels.values()}
        self.forced = threading.Event()
        self.done = threading.Event()
        self.children: dict[int, Child] = {}
        self.doomed: dict[int, Ending] = {}  # slot -> why the heartbeat killed its child

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
        return self.claims.local_used()

    def worker_id(self, index: int) -> str:
        """Who holds the leases of slot ``index``'s runs: ``host:pid:slot`` (see pid_of_worker)."""
        return f"{self.identity}:{index}"

    # -- signals and wake-ups --------------------------------------------------

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

    def kick(self, shard: int | None = None) -> None:
        """Wake the idle slots: they look at their queues (of ``shard``, else of every shard)."""
        note = wake_note(shard)
        for child in list(self.children.values()):
            child.wake(note)

    def _listen(self, pubsub: redis.client.PubSub) -> None:
        """Wake idle slots when a job enters one of their queues, and stop on HALT."""
        backoff = 0.1
        outage = Outage(log, "wake-ups (pub/sub connection lost)")
        while not self.done.is_set():
            try:
                message = pubsub.get_message(timeout=POLL_SECONDS)
                outage.recovered()
                backoff = 0.1
            except redis.RedisError as exc:
                outage.failed(exc, backoff)
                self.done.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                self.kick()  # messages may have been missed: look at the queues
                continue
            if message and message["type"] == "message":
                shard = self.controls.get(message["channel"])
                if shard is not None and self.claims.halts(message["data"], shard):
                    log.info("HALT received")
                    self.halt()
                self.kick(self.queue_shards.get(message["channel"]))

    # -- the children --------------------------------------------------------------

    def _run_slot(self, index: int, channel: socket.socket) -> None:
        """In slot ``index``'s new child (forked by the zygote)."""
        set_title(slot_title(self.worker_id(index)))
        Slot(self.claims, self.events, self.outcomes, index, self.worker_id(index), channel).run()

    def _end_runs_of_dead_child(self, index: int, ending: Ending) -> None:
        """End the run a dead child left on the board: as what it was if its
        work() had completed (see Outcomes), else as expired. Redis may be
        down: retried, until a forced stop, which leaves the lease to the
        dispatcher's reaper rather than wait for Redis."""
        backoff = 0.1
        outage = Outage(log, f"slot {index} (ending the run its dead child left)")
        while runs := self.board.runs(index):
            run = runs[0]
            claims = self.claims.slot(index, self.worker_id(index), shard=run.shard)
            reason = ending.why if ending.token in (None, run.lease.token) else \
                f"killed: the slot's previous job {ending.cause}"
            completed = self.outcomes.read(index, run.lease.token)
            outcome, trace = completed or (Outcome("expired", error=reason), "")
            try:
                settled = claims.finish(run, outcome, trace, None)
                done = settled.done
            except redis.RedisError as exc:
                if self.forced.is_set():
                    self._leave_to_reaper(index, run, reason if completed is None else "", exc)
                    return
                outage.failed(exc, backoff)
                self.forced.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
                continue
            outage.recovered()
            if completed is not None:  # its child reported the run (events) and counted it
                if done == "STALE":
                    self.events.expired(run.lease, LEASE_LOST)
                tell_retry(self.events, run.lease, settled.placed)
                continue
            if done == "STALE" and ending.token == run.lease.token and ending.cause == LOST_ITS_LEASE:
                self.events.expired(run.lease, reason)
                self._note_killed(run)
            else:
                self.events.expired(run.lease, LEASE_LOST if done == "STALE" else reason)
            tell_retry(self.events, run.lease, settled.placed)
            self.board.count_run(index)

    def _leave_to_reaper(self, index: int, run: Running, killed: str, error: redis.RedisError) -> None:
        """A forced stop while Redis is unreachable: the run's lease stays in
        Redis until the dispatcher reaps it (status EXP: the job runs again)."""
        left = f"Redis is unreachable ({error}): its lease is left to the dispatcher's reaper"
        if killed:
            self.events.expired(run.lease, f"{killed}; {left}")
            self.board.count_run(index)
        else:
            log.warning("job %s: its run ended, but %s", run.lease.jobid, left)
        self.board.write(index, [])

    def _note_killed(self, run: Running) -> None:
        """Add to the job's last error that this run was killed when its lease
        was found lost, so that tell says so; only if that record is still
        the reaper's about this run, never over a newer run's."""
        jobid, errors = run.lease.jobid, self.shards.keys[run.shard].errors
        note = f"the run on worker {run.lease.worker} went on past its lease; killed when the worker found it lost"
        with self.shards.clients[run.shard].pipeline() as pipe:
            for _ in range(3):  # another job's error written meanwhile: look again
                try:
                    pipe.watch(errors)
                    record = _error_of(pipe.hget(errors, jobid))
                    if record is None or record.get("status") != "EXP" or record.get("worker") != run.lease.worker \
                            or not isinstance(record.get("at"), (int, float)) or record["at"] < run.lease.since:
                        return
                    record["killed"] = note
                    pipe.multi()
                    pipe.hset(errors, jobid, json.dumps(record))
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue
                except redis.RedisError as exc:
                    log.warning("job %s: cannot note in its last error that its run was killed (%s)", jobid, exc)
                    return

    def _supervise(self, index: int, child: Child) -> Ending:
        """Watch slot ``index``'s child until it ends. Returns why it ended."""
        killed: Ending | None = None
        while True:
            runs = self.board.runs(index)
            now = self.clock()
            deadline = min((run.lease.since + run.lease.timeout for run in runs), default=None)
            if killed is None:
                if self.forced.is_set():
                    killed = Ending("killed: stopped by force")
                    child.kill()
                elif deadline is not None and now >= deadline:
                    late = min(runs, key=lambda run: run.lease.since + run.lease.timeout)
                    killed = Ending(f"killed: timed out after {late.lease.timeout:g}s", late.lease.token, "timed out")
                    child.kill()
            wait = POLL_SECONDS if deadline is None or killed else min(POLL_SECONDS, deadline - now)
            notes, ended = child.wait(wait)
            if NOTE_HALT in notes:
                self.halt()
            elif NOTE_FREED in notes:
                self.kick()
            if ended:
                # The zygote kills a dead child's process group before it
                # records its exit (see zygote.kill_group): waited for, so
                # that the run is not ended (and maybe run again elsewhere)
                # while what it started still runs.
                code = self.board.exit_code(index, child.pid)
                return killed or self.doomed.pop(index, None) or Ending(self._death(code))

    @staticmethod
    def _death(code: int | None) -> str:
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
            self.doomed.pop(index, None)
            self.children[index] = child
            born = time.monotonic()
            try:
                ending = self._supervise(index, child)
            finally:
                del self.children[index]
                child.close()
            if self.board.runs(index):
                self._end_runs_of_dead_child(index, ending)
                self.kick()  # what it held is free again
            if self.board.stopping:
                return
            log.warning("slot %d: worker process %d ended (%s); replaced", index, child.pid, ending.why)
            backoff = min(backoff * 2 or 0.1, MAX_BACKOFF_SECONDS) if time.monotonic() - born < QUICK_DEATH_SECONDS else 0.0
            if backoff and self.done.wait(backoff):
                return

    # -- heartbeats ------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Renew the leases of jobs that run longer than a third of a lease,
        up to their timeout. A lease's deadline is renewed_at + lease + grace."""
        interval = self.lease_seconds / 3
        renewed: dict[str, float] = {}  # token -> when this supervisor last renewed it
        count = self.shards.count
        outages = [Outage(log, "heartbeat" if count == 1 else f"heartbeat (shard {shard})") for shard in range(count)]
        while not self.done.wait(min(interval, POLL_SECONDS * 4)):
            now = self.clock()
            beats: dict[int, list[Any]] = {}  # shard -> its renewals (one call per shard that has any)
            running = self.board.all_runs()
            renewed = {run.lease.token: renewed.get(run.lease.token, run.renewed_at) for run in running}
            for run in running:
                lease = run.lease
                renewed_at = renewed[lease.token]
                cap = lease.since + lease.timeout + GRACE_SECONDS  # killed by then anyway
                # A lease already reaching the job's timeout needs no renewal:
                # jobs that fit in one lease cost no heartbeat traffic at all.
                if now - renewed_at >= interval and renewed_at + self.lease_seconds + GRACE_SECONDS < cap:
                    beats.setdefault(run.shard, []).extend(
                        [lease.jobid, lease.token, repr(min(now + self.lease_seconds + GRACE_SECONDS, cap))])
                    renewed[lease.token] = now
            for shard, renewals in beats.items():
                try:
                    lost = self.claims.spaces[shard].scripts.run("renew", now, [], renewals)
                except redis.RedisError as exc:
                    outages[shard].failed(exc)
                    continue
                outages[shard].recovered()
                for jobid in lost:
                    self._kill_lost(jobid, shard)
            self._register()  # after the renewals: they must not wait for it

    def _register(self) -> None:
        """Write the pool's registry entry if what its slots run changed, or
        it is due (see registry.py); a Redis error waits for the next beat
        (the heartbeat and the slots say that Redis is down)."""
        running = slot_runs(self.board, self.shards.count > 1)
        for registration in self.registrations:
            try:
                registration.refresh(running=running, stopping=self.board.stopping)
            except redis.RedisError as exc:
                log.debug("registry entry %s not written: %s", registration.key, exc)

    def _kill_lost(self, jobid: str, shard: int = 0) -> None:
        """A renewal found the lease of ``jobid`` gone (reaped while this
        worker was stopped or cut off, or the job unset and set again): its run
        may be running elsewhere by now, so kill this one at once."""
        for index in range(self.concurrency):
            run = next((run for run in self.board.runs(index) if run.lease.jobid == jobid and run.shard == shard), None)
            child = self.children.get(index)
            if run is not None and child is not None:
                self.doomed[index] = Ending(
                    "killed: its lease was lost (reaped while this worker was stopped or cut off from Redis)",
                    run.lease.token, LOST_ITS_LEASE)
                child.kill()
                return
        log.warning("job %s: lease lost (reaped or unset) while it ran", jobid)

    # -- the pool's life -------------------------------------------------------------

    def run(self) -> None:
        """Work until HALT or a signal."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        outage = Outage(log, f"worker {self.identity}")
        # Each shard's control value now: a HALT set before the pool started is not for it.
        controls = retried(lambda: [cast(str, space.client.get(space.keys.control) or "") for space in self.claims.spaces],
                           outage, lambda: self.stopping)
        if controls is None:
            log.info("worker %s stopped before it started", self.identity)
            return
        for space, control in zip(self.claims.spaces, controls):
            space.control_seen = control
        # The lock's file lives exactly as long as run(): a pool that never
        # runs (a test's) makes none.
        if self.claims.local_capacity:
            self.claims.local_lock = LocalLock()
        try:
            self._run(outage)
        finally:
            if self.claims.local_lock is not None:
                self.claims.local_lock.remove()
                self.claims.local_lock = None
        log.info("worker %s stopped after %d job(s)", self.identity, self.jobs_done)

    def _run(self, outage: Outage) -> None:
        # Forked while this is still the process's only thread (see slots.py),
        # with the title it keeps. A pool run in a thread beside other roles
        # (the demo, tests) leaves the process's title alone.
        titled = threading.current_thread() is threading.main_thread()
        if titled:
            set_title("redbike work zygote")
        self.zygote = Zygote(self._run_slot, self.board.record_exit)
        if titled:
            set_title(f"redbike work supervisor {':'.join(self.queue_names)}")
        # Every shard's channels, on one connection: a PUBLISH reaches every
        # node of a Redis Cluster, so shard 0's client hears them all.
        channels = [channel for space in self.claims.spaces for channel in (space.keys.control, *space.queue_channels.values())]
        # Subscribed before the first claim, so no wake-up can fall in between.
        try:
            pubsub = retried(lambda: subscribe(self.client, channels), outage, lambda: self.stopping)
        except BaseException:
            self.zygote.close()
            raise
        if pubsub is None:
            self.zygote.close()
            return
        threads = [threading.Thread(target=self._listen, args=(pubsub,), daemon=True, name="redbike-listen")]
        threads.append(threading.Thread(target=self._heartbeat, daemon=True, name="redbike-heartbeat"))
        watchers = [threading.Thread(target=self._watch, args=(i,), name=f"redbike-slot-{i}") for i in range(self.concurrency)]
        self._register()  # at once, not a heartbeat later (before the heartbeat thread writes it)
        for thread in threads + watchers:
            thread.start()
        log.info("worker %s: %d slot(s) on queues %s%s", self.identity, self.concurrency, ":".join(self.queue_names),
                 f" of {self.shards.count} shards" if self.shards.count > 1 else "")
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
            for registration in self.registrations:
                try:
                    registration.remove()
                except redis.RedisError as exc:
                    log.info("registry entry %s left to expire: %s", registration.key, exc)
