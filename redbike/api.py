"""The Python API: ``Redbike(worker, prefix=..., redis_config=..., timefile=...)``."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import redis

from . import explain, nodeview, overview, report
from .capacities import write_capacities, write_capacity
from .clients import connect
from .clock import RedisClock
from .dispatcher import Dispatcher
from .keys import Keys
from .names import BadName, check_jobid, check_queue
from .occurrences import Retry, misfire_text
from .records import (
    CLEAR_NEEDS,
    DEFAULT_MAX_DATA_BYTES,
    DROP_DATA,
    KEEP_DATA,
    MAX_PATHS,
    DataError,
    check_misfire,
    decode_data,
    decode_job,
    encode_alternatives,
    encode_data,
    parse_data,
)
from .resources import (
    ResourceError,
    amounts_of,
    format_amounts,
    read_capacities_csv,
)
from .roundrobin import RoundRobin
from .schedules import ScheduleError, parse_schedule, timestamp_problem
from .scripts import Retention, Scripts
from .shards import check_needs_shard
from .states import BAD, DIE, ENQ, Placement, place_on_set
from .supervisor import WorkerPool
from .timefile import check_timefile, read_timefile

if TYPE_CHECKING:
    from .nodeconfig import NodeConfig
    from .reconcile import Pass

from .jobinput import (
    KEEP,
    NOTHING_STORED,
    SET_CHUNK,
    Queued,
    Stored,
    check_retries,
    parse_retries,
    read_schedules_csv,
    who,
)

log = logging.getLogger(__name__)

Needs = Mapping[str, int] | str | list[dict[str, int]] | None  # a list: one per alternative path
TIMEFILE_AHEAD = 5.0  # seconds a timefile may be ahead of the clock before that is suspicious


JobIdError = BadName  # what callers of earlier versions catch


class Redbike:
    """One redbike installation: a prefix on a Redis server, and the worker
    class whose queue_for() routes its jobs."""

    def __init__(
        self,
        worker: RoundRobin | None = None,
        prefix: str = "redbike",
        redis_config: dict[str, Any] | None = None,
        timefile: str | None = None,
        default_timeout: float = 10.0,
        *,
        client: redis.Redis | None = None,
        clock: Callable[[], float] | None = None,
        misfire: str = "once",
        retries: int = 0,
        retry: Retry | None = None,
        retention: Retention | None = None,
        max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    ) -> None:
        """``misfire`` and ``retries``: the policy of a job set without one
        (the config's ``misfire`` and ``retries``); ``retry``: the backoff of
        retries; ``retention``: keep-finished and trail-length;
        ``max_data_bytes``: the largest payload ``set`` takes (JSON, in bytes)."""
        self.worker = worker if worker is not None else RoundRobin()
        self.keys = Keys(prefix)
        self.client = client if client is not None else connect(redis_config or {}, prefix=prefix)
        self.retention = retention or Retention()
        self.retry_backoff = retry or Retry()
        self.scripts = Scripts(self.client, self.keys, self.retention)
        self.timefile = timefile
        self.default_timeout = default_timeout
        self.misfire = check_misfire(misfire)
        self.retries = check_retries(retries)
        self.max_data_bytes = max_data_bytes
        self.shard_count = 1  # of the installation this is a shard of (sharded.py): a job's needs are on its shard
        # Redis' clock unless one is given: every process and host then agrees on the time.
        self.clock: Callable[[], float] = clock if clock is not None else RedisClock(self.client)

    def _after(self, after: float | None, now: float) -> float:
        """The time runs count from: --after, else the timefile, else now. A timefile
        ahead of now (a clock stepped back, a fast clock where the dispatcher ran)
        would skip the runs until it: runs count from now instead."""
        if after is not None:
            problem = timestamp_problem(after)
            if problem:
                raise ScheduleError(f"bad timestamp: {problem}")
            return after
        recorded = read_timefile(self.timefile)
        if recorded is None:
            return now
        if recorded > now + TIMEFILE_AHEAD:
            log.warning("timefile %s is %.0fs ahead of the clock; counting runs from now",
                        self.timefile, recorded - now)
        return min(recorded, now)

    def _queue_of(self, jobid: str) -> str:
        """The queue of a job (checked, as is the job id)."""
        return check_queue(self.worker.queue_for(check_jobid(jobid)))

    def _place(self, jobid: str, schedule: str, placement: Placement, only_if_new: str, needs: str = "",
               policy: tuple[str, str] = ("", ""), stored: Stored = NOTHING_STORED, *, data: str = KEEP_DATA) -> str:
        """Run set.lua for one job. ``only_if_new``: '1' leaves an existing job as it is,
        'S' one whose schedule is ``schedule``, 'R' one that did not fail
        (status DIE), '0' sets it whatever it has. ``policy``: its misfire
        policy and retries ('' keeps the job's; a new job gets the defaults).
        ``stored``: what the job had (_stored), for the occurrences it cancels.
        ``data``: the payload as stored (records.encode_data), KEEP_DATA or DROP_DATA."""
        now = self.clock()
        reply = self._set_jobs(self._queue_of(jobid), schedule, placement, only_if_new, policy,
                               [(jobid, needs, *stored.unrun(now), data)], now=now, by=who())
        if not isinstance(reply, list):  # queued on the pipeline this Redbike was made with: its reply is [result]
            return reply  # type: ignore[no-any-return]
        return reply[0]  # type: ignore[no-any-return]

    def _set_jobs(self, queue: str, schedule: str, placement: Placement, only_if_new: str, policy: tuple[str, str],
                  jobs: list[tuple[str, str, str, str, str]], *, now: float, by: str, client: Any = None) -> Any:
        """One set.lua call for ``jobs`` of ``queue`` ((jobid, needs, the
        occurrence it is placed for, occurrences missed since, payload) each),
        which share the rest: a list of their results (or, on ``client``, a
        pipeline, the call queued)."""
        return self.scripts.run(
            "set",
            now,
            [self.keys.queue(queue)],
            [schedule, placement.script_arg, self.keys.queue_channel(queue), only_if_new,
             policy[0], self.misfire, policy[1], str(self.retries), by, *(value for job in jobs for value in job)],
            client=client,
        )

    def _stored(self, jobid: str) -> Stored:
        """What a job has before a set or unset changes it (one round trip;
        nothing for a pipelined client: then nothing is read)."""
        if isinstance(self.client, redis.client.Pipeline):
            return NOTHING_STORED
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.schedules, jobid)
            pipe.hget(self.keys.jobs, jobid)
            return Stored.of(*pipe.execute())

    def needs_of(self, jobid: str, needs: Mapping[str, int] | str | None = None) -> dict[str, int]:
        """What a job needs: the worker's needs(jobid) hook, overridden per
        resource by ``needs`` ({"host:a": 1} or "host:a,db:b=2")."""
        merged = amounts_of(self.worker.needs(jobid))
        merged.update(amounts_of(needs))
        return merged

    def _needs_arg(self, jobid: str, needs: Needs) -> str:
        """The needs set.lua stores: '' keeps the stored ones (none were given),
        CLEAR_NEEDS drops them."""
        if isinstance(needs, str) and needs.strip().lower() == CLEAR_NEEDS:
            return CLEAR_NEEDS
        if isinstance(needs, list):  # alternative paths (replicas): the claim takes the first with room
            if not 1 <= len(needs) <= MAX_PATHS:
                raise ResourceError(f"bad needs: {len(needs)} alternative paths (1 to {MAX_PATHS})")
            paths = [self.needs_of(jobid, path) for path in needs]
            check_needs_shard(jobid, (name for path in paths for name in path), self.shard_count)
            return encode_alternatives(paths)
        amounts = self.needs_of(jobid, needs)
        check_needs_shard(jobid, amounts, self.shard_count)
        return format_amounts(amounts)

    def _data_arg(self, data: object) -> str:
        """set.lua's payload argument for ``data`` (KEEP: keep the job's; None: drop it)."""
        return KEEP_DATA if data is KEEP else DROP_DATA if data is None else encode_data(data, self.max_data_bytes)

    def set(self, jobid: str, schedule: str, after: float | None = None, needs: Needs = None, *,
            misfire: str | None = None, grace: float | None = None, retries: int | None = None,
            data: object = KEEP) -> str:
        """Give a job a schedule (and the resources it needs). Returns 'PLACED',
        'PENDING' when the job is running (the new schedule takes effect when
        the run ends), or 'KEPT' for an AT job set again with the schedule it
        has, whose time is before ``after`` (it was entered before: it runs or
        ran once, and is left as it is).

        Needs given (``needs``, else the worker's needs() hook) replace the stored
        ones; none given keeps them; ``needs="none"`` drops them. A list of
        needs (at most MAX_PATHS) gives the job alternative paths (replicas):
        a claim takes the first whose needs all have room.

        ``misfire`` (once, skip, all, all:N; ``grace``: seconds late an
        occurrence may still run under skip) and ``retries`` (runs after
        the first for a run that raised or expired): given, they replace
        the job's; else it keeps its own, and a new job gets the defaults.

        ``data``: the job's payload, any JSON value (never pickled; at most
        max_data_bytes as JSON, else DataError), which work() finds in
        ``self.data``; not given, the job keeps its payload; None drops it.

        A bad schedule raises ScheduleError; a new job is recorded with status
        BAD, and an existing job keeps its schedule untouched. A bad policy
        raises ValueError before anything is stored."""
        self._queue_of(jobid)
        wanted = self._needs_arg(jobid, needs)
        payload = self._data_arg(data)
        if misfire is not None or grace is not None:
            misfire = misfire_text((misfire or "skip").strip().lower(), grace)
        if retries is not None:
            check_retries(retries)
        try:
            parsed = parse_schedule(schedule)
        except ScheduleError as exc:
            kept = self._place(jobid, schedule.strip(), Placement("S", BAD), only_if_new="1") == "KEPT"
            note = "it keeps its previous schedule" if kept else "recorded with status BAD"
            raise ScheduleError(f"{exc} ({jobid} {note})") from None
        now = self.clock()
        start = self._after(after, now)
        # An AT job whose time is before the timefile, set again with the schedule
        # it has, was entered before (a --schedules file loaded again): it ran or
        # runs once, and is left as it is.
        entered = parsed.kind == "AT" and parsed.first_after(start) is None
        stored = self._stored(jobid)
        policy = misfire or stored.misfire(self.misfire)
        return self._place(jobid, parsed.text, place_on_set(parsed, start, now, policy),
                           only_if_new="S" if entered else "0", needs=wanted,
                           policy=(misfire or "", "" if retries is None else str(retries)), stored=stored,
                           data=payload)

    def set_many(self, rows: Iterable[tuple[str, ...]], after: float | None = None) -> list[str]:
        """Set (jobid, schedule[, needs[, misfire[, retries[, data]]]]) rows
        ('' for a value not given; data as JSON text); returns one error line
        per bad row (a new job with a bad schedule is recorded BAD), setting
        all the others."""
        start = self._after(after, self.clock())
        errors = []
        for jobid, schedule, *rest in rows:
            needs, misfire, retries, data = (list(rest) + ["", "", "", ""])[:4]
            try:
                self.set(jobid, schedule, after=start, needs=needs or None, misfire=misfire or None,
                         retries=parse_retries(retries) if retries else None,
                         data=decode_data(parse_data(data, self.max_data_bytes)) if data else KEEP)
            except (ScheduleError, JobIdError, ResourceError, ValueError) as exc:
                errors.append(f"{jobid if jobid.isprintable() else repr(jobid)}: {exc}")  # one line
        return errors

    def set_alike(self, jobs: Iterable[tuple[str, Needs] | tuple[str, Needs, Any]], schedule: str, *,
                  misfire: str | None = None, retries: int | None = None, after: float | None = None) -> dict[str, Any]:
        """Set new jobs that share a schedule and policy, each with its own
        needs and optionally its payload ((jobid, needs, data)), in one round
        trip: queue_alike on a pipeline of its own. Returns each job's result
        ('PLACED', ...), or the error its script answered or its job id, needs
        or payload failed (that one is not sent)."""
        with self.client.pipeline(transaction=False) as pipe:
            queued = self.queue_alike(pipe, jobs, schedule, misfire=misfire, retries=retries, after=after)
            return {**queued.refused, **queued.results(pipe.execute(raise_on_error=False))}

    def queue_alike(self, pipe: Any, jobs: Iterable[tuple[str, Needs] | tuple[str, Needs, Any]], schedule: str, *,
                    misfire: str | None = None, retries: int | None = None, after: float | None = None) -> Queued:
        """Queue on ``pipe`` (a pipeline, e.g. a MULTI; not executed here)
        what sets new jobs as set_alike says: set.lua, as set() runs it for a
        job with nothing stored (what a job has is not read: set an existing
        one with set(), whose cancelled occurrences count), for up to
        SET_CHUNK jobs of a queue per call. The schedule is parsed and the
        first run placed once for all. A bad schedule or policy raises before
        anything is queued. Returns the jobs refused before sending and the
        calls queued (Queued.results reads their replies)."""
        parsed = parse_schedule(schedule)
        if misfire is not None:
            misfire = misfire_text(misfire.strip().lower(), None)
        if retries is not None:
            check_retries(retries)
        now = self.clock()
        start = self._after(after, now)
        placement = place_on_set(parsed, start, now, misfire or self.misfire)
        only_if_new = "S" if parsed.kind == "AT" and parsed.first_after(start) is None else "0"
        policy, by, unrun = (misfire or "", "" if retries is None else str(retries)), who(), NOTHING_STORED.unrun(now)
        queued = Queued()
        by_queue: dict[str, list[tuple[str, str, str, str, str]]] = {}
        for jobid, needs, *data in jobs:
            try:
                job = (jobid, self._needs_arg(jobid, needs), *unrun, self._data_arg(data[0] if data else KEEP))
                by_queue.setdefault(self._queue_of(jobid), []).append(job)
            except (JobIdError, ResourceError, DataError) as exc:
                queued.refused[jobid] = exc
        for queue, values in by_queue.items():
            for first in range(0, len(values), SET_CHUNK):
                chunk = values[first:first + SET_CHUNK]
                self._set_jobs(queue, parsed.text, placement, only_if_new, policy, chunk, now=now, by=by, client=pipe)
                queued.calls.append([jobid for jobid, *_ in chunk])
        return queued

    def retry(self, jobids: Iterable[str] = (), status: str | None = None) -> dict[str, str]:
        """Put failed jobs (status DIE) back at once, for the occurrence that
        failed, with a fresh attempt count; with ``status="DIE"``, all of
        them. Returns each job's result: 'PLACED', 'NOT FAILED' or 'NO SUCH JOB'."""
        if status is not None:
            if status != DIE:
                raise ValueError(f"retry --status takes DIE (the failed jobs), not {status!r}")
            jobids = [jobid for jobid, told, _ in self.statuses() if told == DIE]
        results = {}
        for jobid in jobids:
            self._queue_of(jobid)
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hget(self.keys.schedules, jobid)
                pipe.hget(self.keys.jobs, jobid)
                schedule, record = pipe.execute()
            if schedule is None:
                results[jobid] = "NO SUCH JOB"
                continue
            due = decode_job(record).due
            placement = Placement("Q", ENQ, due=due if due is not None else self.clock(), attempt=1)
            placed = self._place(jobid, schedule, placement, only_if_new="R")
            results[jobid] = "NOT FAILED" if placed == "KEPT" else placed
        return results

    def set_capacity(self, resource: str, capacity: int | None) -> int:
        """Set a resource's capacity (0 pauses it, None makes it unlimited);
        returns how many waiting jobs it woke."""
        return write_capacity(self.scripts, self.clock, resource, capacity)

    def set_capacities(self, capacities: Iterable[tuple[str, int | None]]) -> dict[str, int]:
        """Set many resources' capacities in one round trip (all checked
        first); returns how many waiting jobs each woke."""
        return write_capacities(self.client, self.scripts, self.clock, capacities)

    def load_capacities(self, path: str) -> int:
        """Set the RESOURCE,CAPACITY rows of a CSV file (all checked first, then set in one round trip)."""
        rows = read_capacities_csv(path)
        self.set_capacities(rows)
        return len(rows)

    def capacities(self) -> Iterator[tuple[str, int | None, int, int]]:
        """(resource, capacity or None, in use, jobs waiting) of every resource
        with a capacity or in use."""
        return report.capacities(self.client, self.keys)

    def unset(self, jobid: str) -> int:
        """Remove a job. Returns 0 (unknown), 1 (removed) or 2 (running: it
        completes, then is removed)."""
        queue = self._queue_of(jobid)
        now = self.clock()
        [result] = self.scripts.run("unset", now, [self.keys.queue(queue)],
                                    [who(), jobid, *self._stored(jobid).unrun(now)])
        return int(result)

    def unset_many(self, jobids: Iterable[str]) -> dict[str, int | Exception]:
        """unset() many jobs in two round trips (what each has, read in one
        pipeline; unset.lua for up to SET_CHUNK jobs of a queue per call, in
        another): each one's result, or the error its call answered. Bad job
        ids raise before anything is read."""
        queues = {jobid: self._queue_of(jobid) for jobid in jobids}
        if not queues:
            return {}
        with self.client.pipeline(transaction=False) as pipe:
            for jobid in queues:
                pipe.hget(self.keys.schedules, jobid)
                pipe.hget(self.keys.jobs, jobid)
            read = pipe.execute()
        now, by = self.clock(), who()
        by_queue: dict[str, list[tuple[str, str, str]]] = {}
        memo: dict[tuple[str, float], str] = {}
        for i, (jobid, queue) in enumerate(queues.items()):
            by_queue.setdefault(queue, []).append((jobid, *Stored.of(*read[2 * i:2 * i + 2]).unrun(now, memo)))
        queued = Queued()
        with self.client.pipeline(transaction=False) as pipe:
            for queue, jobs in by_queue.items():
                for first in range(0, len(jobs), SET_CHUNK):
                    chunk = jobs[first:first + SET_CHUNK]
                    self.scripts.run("unset", now, [self.keys.queue(queue)],
                                     [by, *(value for job in chunk for value in job)], client=pipe)
                    queued.calls.append([jobid for jobid, *_ in chunk])
            return queued.results(pipe.execute(raise_on_error=False))

    def tell(self, jobid: str) -> dict[str, Any] | None:
        """Everything known about a job (a task of the node model also gets
        ``task``: its family, node and path); None if there is no such job."""
        told = report.tell(self.client, self.keys, jobid, self._queue_of(jobid))
        task = nodeview.task_of(self.client, self.keys, jobid) if told is not None else None
        if task is not None and told is not None:
            told["task"] = task
        return told

    def schedule_of(self, jobid: str) -> str | None:
        """A job's schedule text, or None if there is no such job."""
        return cast("str | None", self.client.hget(self.keys.schedules, check_jobid(jobid)))

    def explain(self, jobid: str) -> explain.Explanation | None:
        """The job's trail and why it is not running (None: no such job, and no trail)."""
        return explain.explain(self.client, self.keys, jobid, self._queue_of(jobid), self.clock())

    def overview(self, scan: bool = True) -> dict[str, Any]:
        """What `redbike info` shows: Redis, dispatchers, pools and their
        slots, queues, counts per status, busy resources, failures of the
        last hour (overview.py); ``scan=False`` leaves out the two that scan every job."""
        return overview.read(self.client, self.keys, self.clock(), scan=scan)

    def statuses(self, before: float | None = None) -> Iterator[tuple[str, str, int]]:
        return report.statuses(self.client, self.keys, before)

    def schedules(self) -> Iterator[tuple[str, str]]:
        return report.schedules(self.client, self.keys)

    def nodes(self, level: str | None = None) -> Iterator[tuple[str, str, str, int, int]]:
        """(level, name, parent, tasks, running) of every node the reconciler
        stored (of ``level``); parent '' for a top level's."""
        return nodeview.nodes(self.client, self.keys, level)

    def node(self, name: str) -> dict[str, Any] | None:
        """One node: path to the root, capacities, in use, its tasks (None: unknown)."""
        return nodeview.node(self.client, self.keys, name)

    def reconcile_nodes(self, config: NodeConfig, whole: bool = False) -> Pass:
        """Poll every node source of ``config`` once and bring the tasks in
        step with the nodes (reconcile.Busy if another reconciler runs).
        ``whole``: compare every task and capacity, not only those of the
        nodes changed since the last pass."""
        from .nodeloop import reconcile_once  # it imports api

        return reconcile_once(self, config, whole=whole)

    def pause(self, queue: str) -> bool:
        """Stop workers claiming from ``queue`` (their other queues go on; jobs
        still become due into it). True if it was not paused."""
        return bool(self.client.sadd(self.keys.paused, check_queue(queue)))

    def resume(self, queue: str) -> bool:
        """Let workers claim from ``queue`` again, waking the idle ones. True if it was paused."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.srem(self.keys.paused, check_queue(queue))
            pipe.publish(self.keys.queue_channel(queue), "1")
            removed, _ = pipe.execute()
        return bool(removed)

    def paused_queues(self) -> list[str]:
        """The paused queues' names, sorted."""
        return sorted(cast("set[str]", self.client.smembers(self.keys.paused)))

    def control(self, command: str = "HALT") -> str:
        """Tell every running dispatcher and worker to stop after its current
        task. Processes started later are not affected."""
        if command != "HALT":
            raise ValueError(f"unknown control command {command!r} (known: HALT)")
        value = f"HALT:{int(self.clock())}:{os.urandom(4).hex()}"
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.control, value)
            pipe.publish(self.keys.control, value)
            pipe.execute()
        return value

    def dispatch(self, schedules_csv: str | None = None, after: float | None = None,
                 nodes: NodeConfig | None = None) -> None:
        """Set the schedules of a JOBID,SCHEDULE CSV file, then dispatch until
        HALT or a signal. ``nodes``: also reconcile the node model, in a
        thread, while this dispatcher leads."""
        check_timefile(self.timefile)
        if schedules_csv is not None:
            # Each line says what was wrong (schedule, needs, job id).
            for line in self.set_many(read_schedules_csv(schedules_csv), after=after):
                log.error("%s: %s", schedules_csv, line)
        dispatcher = Dispatcher(self.client, self.keys, self.worker.queue_for, timefile=self.timefile, clock=self.clock,
                                retry=self.retry_backoff, retention=self.retention)
        recorded = read_timefile(self.timefile)
        if recorded is not None:
            log.info("timefile %s: dispatched up to %s", self.timefile, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(recorded)))
        if nodes is not None:
            from .nodeloop import ConfigWatch, reconcile_beside  # it imports api

            watch = ConfigWatch(nodes)  # the config's files changed, or SIGHUP: read again
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGHUP, watch.hup)
            beside = reconcile_beside(dispatcher, self, nodes, reload=watch)
        dispatcher.run()
        if nodes is not None:
            beside.join(timeout=30)

    def work(self, concurrency: int = 1, resources: Mapping[str, int] | str | None = None) -> None:
        """Work jobs from the worker's queues until HALT or a signal.
        ``resources``: this pool's worker-local capacities ("cpu_cores=16")."""
        WorkerPool(
            self.client,
            self.keys,
            self.worker,
            concurrency=concurrency,
            default_timeout=self.default_timeout,
            resources=amounts_of(resources, "resources"),
            clock=self.clock,
            retry=self.retry_backoff,
            retention=self.retention,
        ).run()
