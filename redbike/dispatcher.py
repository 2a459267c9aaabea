"""The dispatcher: fires the occurrences that fall due (moves their jobs
from the timeline into their queues, through the misfire policy when they
fire late), reaps the runs whose lease expired (retrying them while they
have retries left), removes what finished jobs left once keep-finished has
passed, and keeps the timefile.

Only one dispatcher acts at a time. It holds a lease in Redis whose token
changes with every new holder, and every script it runs checks that token
(fencing), so a dispatcher that stalled past its lease cannot act after a
standby took over. It sleeps until the next job is due, the next lease
expires or its own lease needs renewing, and is woken early by a message
when a job is set earlier than everything in the timeline.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import redis

from . import stats
from .events import Events, LogEvents, Subscriber, tell_retry
from .keys import Keys
from .occurrences import Retry
from .outage import Outage, retried
from .records import JobRecord, RecordError, decode_job, decode_lease, error_record, lease_token
from .registry import REFRESH_SECONDS, Registration
from .roundrobin import Lease
from .scripts import Retention, Scripts, subscribe
from .states import FORGET, QUEUE, Outcome, Placement, fire_due, place_after_run
from .timefile import write_timefile
from .titles import set_title

log = logging.getLogger(__name__)

LEAD_MS = 5000  # the dispatcher lease; a standby takes over this long after a crash
RENEW_SECONDS = LEAD_MS / 3000  # renew well before it runs out
STANDBY_SECONDS = 1.0  # how often a standby asks for the lease
POLL_SECONDS = 0.5  # how often a sleeping dispatcher looks at its stop flag
TIMEFILE_SECONDS = 1.0  # how often a busy dispatcher rewrites the timefile
TIMEFILE_WARN_SECONDS = 60.0  # how often it says that the timefile cannot be written
BATCH = 1000  # jobs moved per script call
REAP_BATCH = 100
RETIRE_BATCH = 1000  # finished jobs removed per script call
RETIRE_SECONDS = 60.0  # how often the leader removes what finished jobs left
FOREVER = float("inf")


class Dispatcher:
    """Run with :meth:`run`; stops on HALT, SIGTERM or SIGINT."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        queue_for: Callable[[str], str],
        *,
        timefile: str | None = None,
        events: Subscriber | None = None,
        clock: Callable[[], float] = time.time,
        batch: int = BATCH,
        retry: Retry | None = None,
        retention: Retention | None = None,
        registry_seconds: float = REFRESH_SECONDS,
    ) -> None:
        """``registry_seconds``: how often the dispatcher's registry entry is
        written while nothing changes (it expires after three times that)."""
        self.client = client
        self.keys = keys
        self.retention = retention or Retention()
        self.retry = retry or Retry()
        self.scripts = Scripts(client, keys, self.retention)
        self.queue_for = queue_for
        self.timefile = timefile
        self.clock = clock
        self.batch = batch
        # Reaped runs are told to the job events seam, as the workers' are.
        self.events: Subscriber = events if events is not None else Events(LogEvents())
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.token: str | None = None
        self.stopping = threading.Event()
        self.control_seen = ""
        self.next_due = FOREVER
        self.next_deadline = FOREVER
        self.timefile_written = 0.0
        self.timefile_warned = -FOREVER  # monotonic time of the last warning that it cannot be written
        self.moved = 0
        self.reaped = 0
        self.retired_at = -FOREVER
        self.snapshot_minute = -1.0
        self.registration = Registration(client, keys, "dispatcher", self.identity, clock=clock,
                                         refresh_seconds=registry_seconds)
        self.titled_leader: bool | None = None

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    # -- the lease -------------------------------------------------------------

    def lead(self, now: float, milliseconds: int = LEAD_MS) -> bool:
        """Take or renew the lease and learn what is next (one round trip).
        Returns whether this dispatcher leads."""
        reply = self.scripts.run(
            "lead", now, [self.keys.dispatcher_epoch], [self.token or "", milliseconds, self.identity]
        )
        if milliseconds == 0:
            self.token = None
            return False
        token, next_due, next_deadline, control = reply
        if token and token != self.token:
            log.info("dispatcher %s leads (token %s)", self.identity, token)
        elif not token and self.token:
            log.warning("dispatcher %s lost its lease; standing by", self.identity)
        self.token = token or None
        self.next_due = float(next_due) if next_due else FOREVER
        self.next_deadline = float(next_deadline) if next_deadline else FOREVER
        if control and control != self.control_seen and control.startswith("HALT"):
            log.info("HALT found")
            self.stop()
        return self.token is not None

    # -- the work --------------------------------------------------------------

    def _queue_args(self, jobids: list[str]) -> tuple[list[str], list[Any], list[int]]:
        """Queue KEYS and channel ARGV for a batch, and each job's queue index."""
        index: dict[str, int] = {}
        positions = [index.setdefault(self.queue_for(jobid), len(index) + 1) for jobid in jobids]
        keys = [self.keys.queue(name) for name in index]
        args: list[Any] = [len(index)] + [self.keys.queue_channel(name) for name in index]
        return keys, args, positions

    def move_due(self, now: float) -> int:
        """Fire every occurrence due at ``now``, a batch per script."""
        moved = 0
        while not self.stopping.is_set():
            due = cast("list[tuple[str, float]]", self.client.zrangebyscore(
                self.keys.timeline, "-inf", now, start=0, num=self.batch, withscores=True))
            if not due:
                break
            placements = self._placements(due, now)
            keys, args, positions = self._queue_args([jobid for jobid, _ in due])
            for (jobid, score), position in zip(due, positions):
                args += [jobid, position, repr(score), placements[jobid].script_arg]
            moved += self.scripts.run("move_due", now, keys, [self.token, *args])
            if len(due) < self.batch:
                break
        self.moved += moved
        return moved

    def _placements(self, due: list[tuple[str, float]], now: float) -> dict[str, Placement]:
        """Where each due job goes: its queue, unless it fires late (then its
        misfire policy decides: one more round trip, for the late ones only)."""
        late = [jobid for jobid, score in due if now - score >= 1]
        found: list[Any] = []
        if late:  # two commands per batch, not two per job
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hmget(self.keys.schedules, late)
                pipe.hmget(self.keys.jobs, late)
                found = pipe.execute()
        schedules = dict(zip(late, found[0] if found else []))
        records = dict(zip(late, found[1] if found else []))
        placements = {}
        for jobid, score in due:
            if now - score < 1:  # on time: into its queue, for the occurrence its record holds
                placements[jobid] = QUEUE
                continue
            placement = fire_due(schedules.get(jobid), self._job(jobid, records.get(jobid)), score, now)
            if placement.skipped or placement.coalesced:
                log.info("job %s fired %.0fs late: %s", jobid, now - score, _misfire_sentence(placement))
            placements[jobid] = placement
        return placements

    @staticmethod
    def _job(jobid: str, record: str | None) -> JobRecord:
        try:
            return decode_job(record)
        except RecordError as exc:
            log.warning("job %s: %s; its misfire policy is taken as once", jobid, exc)
            return JobRecord()

    def reap(self, now: float) -> int:
        """End the runs whose lease deadline passed and put their jobs back."""
        expired = cast("list[str]", self.client.zrangebyscore(self.keys.deadlines, "-inf", now, start=0, num=REAP_BATCH))
        if not expired:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for jobid in expired:
                pipe.hget(self.keys.leases, jobid)
                pipe.hget(self.keys.schedules, jobid)
                pipe.hget(self.keys.jobs, jobid)
            found = pipe.execute()
        runs: list[tuple[str, str, str | None, str | None]] = [
            run for run in zip(expired, found[0::3], found[1::3], found[2::3]) if run[1] is not None]
        keys, args, positions = self._queue_args([jobid for jobid, _, _, _ in runs])
        reasons: dict[str, tuple[Lease, str, Placement]] = {}
        for (jobid, lease, schedule, job), position in zip(runs, positions):
            record = self._job(jobid, job)
            try:
                leased = decode_lease(lease)
                held = Lease(jobid, leased.token, leased.queue, leased.worker, leased.since, leased.timeout,
                             leased.due, leased.attempt)
                record = replace(record, due=leased.due, attempt=leased.attempt)  # the run's occurrence
                ran = f" ({now - held.since:.0f}s after it claimed the job)"
            except RecordError as exc:  # still reaped: the token is all the script needs
                log.warning("job %s: %s", jobid, exc)
                held, ran = Lease(jobid, lease_token(lease), "?", "?", now, 0.0), ""
            reason = f"lease expired: worker {held.worker} stopped renewing it{ran}"
            placement = FORGET if schedule is None else \
                place_after_run(schedule, Outcome("expired", error=reason), now, record, self.retry)
            error = error_record(placement.status or "EXP", reason, held.worker, now)
            args += [jobid, held.token, placement.script_arg, error, str(placement.fires), position]
            reasons[jobid] = held, f"lease of worker {held.worker} expired; {_sentence(placement)}", placement
        reaped = cast("list[str]", self.scripts.run("reap", now, keys, [self.token, *args]))
        for jobid in reaped:  # not those renewed or ended meanwhile: the script left them alone
            held, reason, placement = reasons[jobid]
            self.events.expired(held, reason)
            tell_retry(self.events, held, placement)
        self.reaped += len(reaped)
        return len(reaped)

    def retire(self, now: float) -> int:
        """Remove what the jobs that ended for good keep-finished ago left."""
        self.retired_at = now
        cutoff = repr(now - self.retention.keep_finished)
        looked = total = int(self.scripts.run("retire", now, [], [self.token, cutoff, RETIRE_BATCH]))
        while looked >= RETIRE_BATCH and not self.stopping.is_set():
            looked = int(self.scripts.run("retire", now, [], [self.token, cutoff, RETIRE_BATCH]))
            total += looked
        return total

    def _write_timefile(self, now: float, force: bool = False) -> None:
        """A timefile that cannot be written (disk full, folder gone) costs only the
        catch-up of missed runs after a restart: warn, now and then, and dispatch on."""
        if not self.timefile or not (force or now - self.timefile_written >= TIMEFILE_SECONDS):
            return
        self.timefile_written = now
        try:
            write_timefile(self.timefile, now)
        except OSError as exc:
            if time.monotonic() >= self.timefile_warned + TIMEFILE_WARN_SECONDS:
                self.timefile_warned = time.monotonic()
                log.warning("cannot write the timefile %s (%s); dispatching on without it",
                            self.timefile, exc.strerror or exc)
            return
        if self.timefile_warned > -FOREVER:
            log.info("timefile %s written again", self.timefile)
            self.timefile_warned = -FOREVER

    # -- the loop ----------------------------------------------------------------

    def _register(self) -> None:
        """Title and registry entry: whether it leads (written when that
        changed, else every registry_seconds; see registry.py)."""
        leads = self.token is not None
        # A dispatcher run in a thread beside other roles (the demo) leaves the title alone.
        if leads != self.titled_leader and threading.current_thread() is threading.main_thread():
            set_title(f"redbike dispatch ({'leader' if leads else 'standby'})")
            self.titled_leader = leads
        self.registration.refresh(leads=leads)

    def _sleep(self, pubsub: redis.client.PubSub, seconds: float) -> None:
        """Sleep up to ``seconds``; a message cuts it short."""
        until = time.monotonic() + max(0.0, seconds)
        while not self.stopping.is_set():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            message = pubsub.get_message(timeout=min(remaining, POLL_SECONDS))
            if not message or message["type"] != "message":
                continue
            if message["channel"] == self.keys.control:
                if message["data"].startswith("HALT") and message["data"] != self.control_seen:
                    log.info("HALT received")
                    self.stop()
                return
            try:
                self.next_due = min(self.next_due, float(message["data"]))
            except ValueError:
                pass
            return

    def step(self, now: float) -> float:
        """One pass: renew, move, reap, retire, snapshot the counters. Returns
        the seconds to sleep after it."""
        if not self.lead(now):
            return STANDBY_SECONDS
        busy = False
        if self.next_due <= now:
            busy = self.move_due(now) > 0 or busy
        if self.next_deadline <= now:
            busy = self.reap(now) > 0 or busy
        if now - self.retired_at >= RETIRE_SECONDS:
            self.retire(now)
        if now // 60 != self.snapshot_minute:  # the counters' per-minute snapshot (stats.py)
            stats.snapshot(self.client, self.keys, now)
            self.snapshot_minute = now // 60
        self._write_timefile(now, force=not busy)
        if busy:
            return 0.0
        wake = min(self.next_due, self.next_deadline, now + RENEW_SECONDS)
        return max(wake - now, 0.005)  # never spin, even if a due job could not move

    def run(self) -> None:
        """Dispatch until HALT or a signal."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        outage = Outage(log, f"dispatcher {self.identity}")
        started = retried(lambda: (self.client.get(self.keys.control),
                                   subscribe(self.client, [self.keys.control, self.keys.dispatcher_channel])),
                          outage, self.stopping.is_set)
        if started is None:
            log.info("dispatcher %s stopped before it started", self.identity)
            return
        control, pubsub = started
        self.control_seen = cast(str, control or "")
        log.info("dispatcher %s started", self.identity)
        retry_in = 0.0  # seconds to wait after a Redis error; 0 while all is well
        try:
            while not self.stopping.is_set():
                try:
                    wait = self.step(self.clock())
                    self._register()
                    self._sleep(pubsub, wait)
                    if retry_in:
                        outage.recovered()
                    retry_in = 0.0
                except redis.RedisError as exc:  # connection lost, server loading, fenced ...
                    if isinstance(exc, redis.ResponseError) and "FENCED" in str(exc):
                        log.warning("dispatcher %s was fenced off; standing by", self.identity)
                        self.token = None
                        self.stopping.wait(STANDBY_SECONDS)
                        continue
                    retry_in = min(retry_in * 2 or 0.1, 5.0)
                    outage.failed(exc, retry_in)
                    self.stopping.wait(retry_in)
        finally:
            pubsub.close()
            try:
                if self.token:
                    self.lead(self.clock(), milliseconds=0)
                self.registration.remove()
            except redis.RedisError:
                pass
        log.info("dispatcher %s stopped: %d moved, %d reaped", self.identity, self.moved, self.reaped)


def _misfire_sentence(placement: Placement) -> str:
    counts = f"{placement.coalesced} occurrence(s) coalesced, {placement.skipped} skipped by its misfire policy"
    if placement.kind == "Q":
        return f"{counts}; it runs for {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(placement.due or 0))}"
    return f"{counts}; {_sentence(placement)}"


def _sentence(placement: Placement) -> str:
    """Where a reaped job went, for the log."""
    if placement.kind == "T" and placement.at is not None:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(placement.at))
        return f"back in the timeline for {when} (status {placement.status})"
    if placement.kind == "D":
        return "removed (it was unset while it ran)"
    return f"not run again (status {placement.status})"
