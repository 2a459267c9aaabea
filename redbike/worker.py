"""The worker pool: one supervisor process that talks to Redis, and one child
process per slot that runs work().

The supervisor claims a job, hands it to its slot's child over a pipe, and
ends the run and claims the next job in one round trip. Because the child
runs the user's code, a job that holds the GIL for minutes (a C extension)
cannot starve the heartbeats that renew its lease, and a job that overruns
its timeout is killed rather than left running beside its own retry. A child
that dies is replaced. Each slot holds at most the one job it runs: no prefetch.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import redis

from .keys import Keys, Scripts, subscribe
from .resources import LOCAL_PREFIX, format_amounts, parse_amounts
from .roundrobin import Lease, RoundRobin, StopWork, UnsetJob
from .states import Outcome, parse_status, place_after_run

log = logging.getLogger(__name__)

LEASE_SECONDS = 15.0  # a running job's lease outlives its last heartbeat by this much
GRACE_SECONDS = 2.0  # past a timeout: time for the supervisor to kill the job and report
IDLE_RECHECK_SECONDS = 5.0  # an idle slot looks at its queues this often without a wake-up
POLL_SECONDS = 0.5  # how often blocked waits look at the stop flags
MAX_BACKOFF_SECONDS = 5.0


def error_record(status: str, error: str, worker: str, now: float, trace: str = "") -> str:
    """The JSON kept in the errors hash for tell."""
    record = {"status": status, "at": now, "error": error, "worker": worker}
    if trace:
        record["traceback"] = trace
    return json.dumps(record)


def _die_with_parent() -> None:
    """Ask Linux to kill this child when its supervisor dies (even by SIGKILL),
    so a job never outlives the lease that its supervisor stopped renewing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


def _child_main(worker: RoundRobin, conn: Connection) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        try:
            lease = Lease(**json.loads(conn.recv_bytes()))
        except EOFError:
            return
        worker.lease = lease
        try:
            result = worker.work(lease.jobid)
            backoff = result if isinstance(result, int) and not isinstance(result, bool) else None
            reply: dict[str, Any] = {"kind": "ok", "backoff": backoff}
        except StopWork:
            reply = {"kind": "stop"}
        except UnsetJob:
            reply = {"kind": "unset"}
        except Exception as exc:  # any failure of the job is reported, not fatal
            reply = {
                "kind": "error",
                "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                "trace": traceback.format_exc()[-4000:],
            }
        finally:
            worker.lease = None
        conn.send_bytes(json.dumps(reply).encode())


class JobProcess:
    """The child process of one slot."""

    def __init__(self, worker: RoundRobin) -> None:
        self.worker = worker
        self.start()

    # One fork at a time: a child forked by another slot between Pipe() and
    # close() would inherit this child's end and hide its death (no EOF).
    _forking = threading.Lock()

    def start(self) -> None:
        context = multiprocessing.get_context("fork")
        with JobProcess._forking:
            self.conn, child_end = context.Pipe()
            self.process = context.Process(target=_child_main, args=(self.worker, child_end), daemon=True)
            self.process.start()
            child_end.close()  # so that the child's death reads as EOF here

    def stop(self) -> None:
        self.conn.close()
        self.process.join(timeout=POLL_SECONDS)
        if self.process.is_alive():
            self.kill()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def run(self, lease: Lease, forced: threading.Event) -> tuple[Outcome, str]:
        """Run one job; returns its outcome and the traceback of a failure."""
        message = json.dumps(lease.__dict__).encode()
        try:
            self.conn.send_bytes(message)
        except OSError:  # the child died while idle: the job has not started, so a new child runs it
            log.warning("worker process %s died while idle (exit code %s); replaced", self.process.pid, self.process.exitcode)
            self.kill()
            self.start()
            self.conn.send_bytes(message)
        deadline = time.monotonic() + lease.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or forced.is_set():
                self.kill()
                self.start()
                why = f"timed out after {lease.timeout:g}s" if remaining <= 0 else "stopped by force"
                return Outcome("expired", error=f"killed: {why}"), ""
            if self.conn.poll(min(remaining, POLL_SECONDS)):
                try:
                    reply = json.loads(self.conn.recv_bytes())
                except (EOFError, OSError):  # EOF, or ECONNRESET if it died with our message unread
                    self.kill()
                    code = self.process.exitcode
                    self.start()
                    return Outcome("expired", error=f"worker process died (exit code {code})"), ""
                outcome = Outcome(reply["kind"], reply.get("backoff"), reply.get("error", ""))
                return outcome, reply.get("trace", "")


@dataclass
class Running:
    """A claimed job, as its slot knows it."""

    lease: Lease
    schedule: str
    enqueued_at: float
    renewed_at: float
    local_needs: dict[str, int]  # worker-local amounts it holds


class Rotation:
    """The weighted round robin of one slot over the worker's queue names."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.cursor = 0

    def order(self) -> list[tuple[int, str]]:
        """(position, name) of each distinct queue, from the cursor on."""
        seen: set[str] = set()
        order = []
        for step in range(len(self.names)):
            position = (self.cursor + step) % len(self.names)
            name = self.names[position]
            if name not in seen:
                seen.add(name)
                order.append((position, name))
        return order

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
        # Worker-local resources (cpu_cores=16 ...): this pool counts them
        # itself, under a lock, and tells each claim how much is free.
        self.local_capacity = {f"{LOCAL_PREFIX}{name}": amount for name, amount in (resources or {}).items()}
        self.local_used: dict[str, int] = dict.fromkeys(self.local_capacity, 0)
        self.local_lock = threading.Lock() if self.local_capacity else None
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
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.stopping = threading.Event()
        self.forced = threading.Event()
        self.done = threading.Event()
        self.wake = threading.Condition()
        self.wakeups = 0
        self.running: dict[int, Running] = {}
        self.control_seen = ""
        self.done_per_slot = [0] * concurrency
        # Each slot thread keeps one connection of the pool for its claims and
        # finishes (see _connection).
        self.slot = threading.local()

    @property
    def jobs_done(self) -> int:
        """Runs ended so far (each slot counts its own, so no lock is needed)."""
        return sum(self.done_per_slot)

    # -- signals and wake-ups -------------------------------------------------

    def stop(self, *_: Any) -> None:
        """First call: finish running jobs, claim no more. Second: kill them."""
        if self.stopping.is_set():
            self.forced.set()
        self.stopping.set()
        self.kick()

    def kick(self) -> None:
        with self.wake:
            self.wakeups += 1
            self.wake.notify_all()

    def wait_for_work(self, seen: int) -> None:
        with self.wake:
            if self.wakeups == seen and not self.stopping.is_set():
                self.wake.wait(IDLE_RECHECK_SECONDS)

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
                    self.stop()
                self.kick()

    def _halts(self, control: str | None) -> bool:
        return bool(control) and control != self.control_seen and control.startswith("HALT")

    # -- the claim / finish round trips ---------------------------------------

    def _claim_part(
        self, rotation: Rotation, token: str, worker_id: str, freed: dict[str, int]
    ) -> tuple[list[str], list[Any], list[tuple[int, str]]]:
        """KEYS and ARGV of a claim (claim() in lib.lua), and the queue order
        tried. ``freed``: local amounts the same script releases first."""
        order = rotation.order()
        keys = [self.keys.queue(name) for _, name in order]
        free = {
            name: capacity - self.local_used[name] + freed.get(name, 0)
            for name, capacity in self.local_capacity.items()
        }
        args: list[Any] = [token, worker_id, self.control_seen, format_amounts(free)]
        for _, name in order:
            timeout = self.timeouts[name]
            args += [name, timeout, min(timeout, self.lease_seconds) + GRACE_SECONDS]
        return keys, args, order

    def _job_from(
        self, reply: list[Any], order: list[tuple[int, str]], rotation: Rotation, token: str, worker_id: str, now: float
    ) -> Running | None:
        if reply[0] == "HALT":
            if self._halts(reply[1]):
                log.info("HALT found")
                self.stop()
            return None
        if reply[0] != "JOB":
            return None
        _, jobid, index, schedule, status, needs = reply
        position, queue = order[int(index)]
        rotation.served(position)
        event, stamp = parse_status(status) if status else ("", now)
        lease = Lease(jobid, token, queue, worker_id, now, self.timeouts[queue])
        local = {name: amount for name, amount in parse_amounts(needs).items() if name in self.local_capacity}
        for name, amount in local.items():
            self.local_used[name] += amount
        return Running(lease, schedule, stamp if event == "ENQ" else now, now, local)

    @property
    def _connection(self) -> redis.Redis | None:
        """The calling slot's own connection, made on first use (inside the
        slot's retry loop: Redis may be down); None (the pool's client) outside slots."""
        if not getattr(self.slot, "owned", False):
            return None
        if self.slot.client is None:
            self.slot.client = redis.Redis(connection_pool=self.client.connection_pool, single_connection_client=True)
        return self.slot.client

    def _settle(self, job: Running | None, outcome: Outcome | None, trace: str,
                rotation: Rotation | None, worker_id: str) -> tuple[str | None, Running | None]:
        """One round trip: end ``job``'s run (if any) and, with a rotation, claim
        the next job. Returns how the run ended (finish() in lib.lua) and the
        job claimed."""
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
        if job is None:
            reply = self.scripts.run("claim", now, keys, args, client=self._connection)
        else:
            done, reply = self.scripts.run("finish", now, keys, args, client=self._connection)
            if done == "STALE":
                log.warning("job %s: lease lost before it ended; its outcome is dropped", job.lease.jobid)
            for name, amount in freed.items():
                self.local_used[name] -= amount
            if freed:
                self.kick()  # idle slots may have room now
        if rotation is None:
            return done, None
        while reply[0] == "MORE":  # the claim parked many jobs: look again (a loop: there may be thousands)
            now = self.clock()
            claim_keys, claim_args, order = self._claim_part(rotation, token, worker_id, {})
            reply = self.scripts.run("claim", now, claim_keys, claim_args, client=self._connection)
        return done, self._job_from(reply, order, rotation, token, worker_id, now)

    def settle(self, job: Running | None, outcome: Outcome | None, trace: str,
               rotation: Rotation | None, worker_id: str) -> tuple[str | None, Running | None]:
        """End a run and/or claim, holding the local-resource lock if this pool has one."""
        if self.local_lock is None:
            return self._settle(job, outcome, trace, rotation, worker_id)
        with self.local_lock:
            return self._settle(job, outcome, trace, rotation, worker_id)

    def claim(self, rotation: Rotation, worker_id: str) -> Running | None:
        """Claim one job (one round trip)."""
        return self.settle(None, None, "", rotation, worker_id)[1]

    def finish(
        self, job: Running, outcome: Outcome, trace: str, rotation: Rotation | None, worker_id: str
    ) -> tuple[str | None, Running | None]:
        """End ``job``'s run; with a rotation, claim the next job in the same round trip."""
        return self.settle(job, outcome, trace, rotation, worker_id)

    # -- the slots -------------------------------------------------------------

    def _slot(self, index: int) -> None:
        worker_id = f"{self.identity}:{index}"
        rotation = Rotation(self.queue_names)
        child = JobProcess(self.worker)
        # One connection held for the slot's life: no pool checkout per job.
        self.slot.owned, self.slot.client = True, None
        job: Running | None = None
        finished: tuple[Outcome, str] | None = None
        retry_in = 0.0  # seconds to wait after a Redis error; 0 while all is well
        try:
            while True:
                seen = self.wakeups
                try:
                    if finished is not None and job is not None:
                        # After an error, a script may have run without its reply
                        # reaching us: end the run alone, so no claim is lost with it.
                        fused = None if self.stopping.is_set() or retry_in else rotation
                        _, job = self.finish(job, *finished, fused, worker_id)
                        finished = None
                    elif self.stopping.is_set():
                        return
                    else:
                        job = self.claim(rotation, worker_id)
                    retry_in = 0.0
                except Exception as exc:  # Redis down, or a bug: log, back off, try again
                    retry_in = min(retry_in * 2 or 0.1, MAX_BACKOFF_SECONDS)
                    if isinstance(exc, redis.RedisError):
                        log.warning("slot %d: Redis error (%s); retrying in %.1fs", index, exc, retry_in)
                    else:
                        log.exception("slot %d: unexpected error; retrying in %.1fs", index, retry_in)
                    if self.forced.wait(retry_in):
                        return
                    continue
                if job is None:
                    if not self.stopping.is_set():
                        self.wait_for_work(seen)
                    continue
                self.running[index] = job
                try:
                    finished = child.run(job.lease, self.forced)
                finally:
                    self.running.pop(index, None)
                self.done_per_slot[index] += 1
        finally:
            child.stop()
            if self.slot.client is not None:
                self.slot.client.close()

    def _heartbeat(self) -> None:
        """Renew the leases of jobs that run longer than a third of a lease,
        up to their timeout. A lease's deadline is renewed_at + lease + grace."""
        interval = self.lease_seconds / 3
        while not self.done.wait(min(interval, POLL_SECONDS * 4)):
            now = self.clock()
            beats: list[Any] = []
            for job in list(self.running.values()):
                lease = job.lease
                cap = lease.since + lease.timeout + GRACE_SECONDS  # killed by then anyway
                # A lease already reaching the job's timeout needs no renewal:
                # jobs that fit in one lease cost no heartbeat traffic at all.
                if now - job.renewed_at >= interval and job.renewed_at + self.lease_seconds + GRACE_SECONDS < cap:
                    beats += [lease.jobid, lease.token, repr(min(now + self.lease_seconds + GRACE_SECONDS, cap))]
                    job.renewed_at = now
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
        channels = [self.keys.queue_channel(name) for name in set(self.queue_names)]
        # Subscribed before the first claim, so no wake-up can fall in between.
        pubsub = subscribe(self.client, [self.keys.control, *channels])
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        threads = [threading.Thread(target=self._listen, args=(pubsub,), daemon=True, name="redbike-listen")]
        threads.append(threading.Thread(target=self._heartbeat, daemon=True, name="redbike-heartbeat"))
        slots = [threading.Thread(target=self._slot, args=(i,), name=f"redbike-slot-{i}") for i in range(self.concurrency)]
        for thread in threads + slots:
            thread.start()
        log.info("worker %s: %d slot(s) on queues %s", self.identity, self.concurrency, ":".join(self.queue_names))
        try:
            for slot in slots:
                while slot.is_alive():
                    slot.join(POLL_SECONDS)
        finally:
            self.done.set()
            for thread in threads:
                thread.join()
            pubsub.close()
        log.info("worker %s stopped after %d job(s)", self.identity, self.jobs_done)
