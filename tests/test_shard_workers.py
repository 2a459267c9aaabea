"""One worker pool serving every shard of an installation (issue #12),
in-process against a real Redis server: four shards on one server, jobs
set on each shard directly, one WorkerPool(..., shards=...) in a thread;
and four shards over the primaries of a Redis Cluster."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cluster import Cluster
from conftest import SCRIPT_COMMANDS, script_calls, wait_for

from redbike import Redbike, RoundRobin, StopWork
from redbike import slot as slot_module
from redbike.claims import Settled
from redbike.records import error_record
from redbike.registry import live
from redbike.scripts import sources
from redbike.shardclaims import SlotShards
from redbike.shards import Shards, shard_prefix
from redbike.slots import Running
from redbike.states import OK
from redbike.stats import totals
from redbike.supervisor import WorkerPool

SHARDS = 4
CONTINUE_RUNS = 3  # a CONTINUE job stops once every one has run this often


class Recording(RoundRobin):
    """Notes each run (job id, pid) in ``folder``/runs. ``cont-*`` jobs stop
    themselves once every ``cont-*`` job has run CONTINUE_RUNS times (or
    after a minute); ``hold-*`` jobs write their pid to ``folder``/JOBID.pid
    and run until ``folder``/release exists."""

    folder = Path()  # set before the pool forks its children

    def timeout(self, queue_name: str) -> float | None:
        return 60

    def work(self, jobid: str) -> None:
        with open(self.folder / "runs", "a") as runs:
            runs.write(f"{jobid} {os.getpid()}\n")
        kind = jobid.split("-")[0]
        if kind == "cont":
            time.sleep(0.02)
            runs = [count for name, count in ran(self.folder).items() if name.startswith("cont-")]
            if len(runs) == SHARDS and min(runs) >= CONTINUE_RUNS or time.time() > float(jobid.split("-")[1]):
                raise StopWork("every CONTINUE job ran")
        elif kind == "hold":
            (self.folder / f"{jobid}.pid").write_text(str(os.getpid()))
            until = time.monotonic() + 30
            while not (self.folder / "release").exists() and time.monotonic() < until:
                time.sleep(0.02)


def ran(folder: Path) -> Counter[str]:
    """Runs started, by job id."""
    path = folder / "runs"
    return Counter(line.split()[0] for line in path.read_text().splitlines()) if path.exists() else Counter()


def ids_on(shards: Shards, shard: int, stem: str, count: int) -> list[str]:
    """``count`` job ids ``STEM-N:A`` whose shard is ``shard``."""
    found: list[str] = []
    number = 0
    while len(found) < count:
        jobid = f"{stem}-{number}:A"
        if shards.of(jobid) == shard:
            found.append(jobid)
        number += 1
    return found


class Installation:
    """Four shards on the test's server, a Redbike on each (jobs are set on
    their own shard, as the sharded facade does), and a pool serving all."""

    def __init__(self, client: redis.Redis, prefix: str, folder: Path, shards: Shards | None = None) -> None:
        self.client = client
        self.folder = folder
        self.shards = shards or Shards.on(client, prefix, SHARDS)
        self.worker = Recording("A")
        self.bikes = [Redbike(self.worker, prefix=keys.prefix, client=shard_client)
                      for shard_client, keys in zip(self.shards.clients, self.shards.keys)]

    def set(self, jobid: str, schedule: str = "NOW") -> None:
        self.bikes[self.shards.of(jobid)].set(jobid, schedule)

    def tell(self, jobid: str, shard: int | None = None) -> dict:
        told = self.bikes[self.shards.of(jobid) if shard is None else shard].tell(jobid)
        assert told is not None
        return told

    def status(self, jobid: str, shard: int | None = None) -> str:
        return str(self.tell(jobid, shard)["status"])

    def pid_of(self, jobid: str) -> int:
        path = self.folder / f"{jobid}.pid"
        return int(wait_for(lambda: path.exists() and path.read_text(), what=f"{jobid} to start"))  # type: ignore[arg-type]

    def release(self) -> None:
        (self.folder / "release").touch()


@pytest.fixture
def shop(client: redis.Redis, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Installation:
    monkeypatch.setattr(Recording, "folder", tmp_path)
    return Installation(client, prefix, tmp_path)


@contextlib.contextmanager
def serving(shop: Installation, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[WorkerPool, threading.Thread]]:
    """The pool, 2 slots over the 4 shards, running in a thread. Its idle
    slots look at their queues only when woken (their own look every
    IDLE_RECHECK_SECONDS made an hour), so that a test fails if a wake-up
    or a HALT's message from a shard does not reach them."""
    monkeypatch.setattr(slot_module, "IDLE_RECHECK_SECONDS", 3600.0)  # inherited by the children
    pool = WorkerPool(shop.shards.clients[0], shop.shards.keys[0], shop.worker, concurrency=2, lease_seconds=1.2,
                      shards=shop.shards)
    thread = threading.Thread(target=pool.run)
    thread.start()
    try:
        yield pool, thread
    finally:
        shop.release()
        pool.halt()
        thread.join(20)
    assert not thread.is_alive()


@pytest.fixture
def running(shop: Installation, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[WorkerPool, threading.Thread]]:
    with serving(shop, monkeypatch) as started:
        yield started


def test_on_cluster_one_pool_serves_shards_on_several_primaries(cluster: Cluster, prefix: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Four shards over the cluster's primaries (a client pinned to each
    shard's): the pool's one subscription, on shard 0's primary, hears the
    wake-ups and the HALT of shards on the others (a PUBLISH reaches every
    node), and each job runs once on its shard."""
    nodes = cluster.client()
    primary = [nodes.get_node_from_key(f"{shard_prefix(prefix, k, SHARDS)}:schedules").port for k in range(SHARDS)]
    away = [k for k in range(SHARDS) if primary[k] != primary[0]]
    assert away, f"every shard of {prefix} is on one primary: pick another prefix"
    monkeypatch.setattr(Recording, "folder", tmp_path)
    shop = Installation(nodes, prefix, tmp_path, Shards.connect({"cluster": cluster.addresses}, prefix, SHARDS))
    with serving(shop, monkeypatch) as (_, thread):
        jobs = [ids_on(shop.shards, shard, "once", 2) for shard in range(SHARDS)]
        everything = [jobid for shard_jobs in jobs for jobid in shard_jobs]
        for jobid in everything:
            shop.set(jobid)
        wait_for(lambda: all(shop.status(jobid).startswith("END:") for jobid in everything), timeout=20,
                 what="every shard's jobs")
        assert all(ran(tmp_path)[jobid] == 1 for jobid in everything)
        for shard in range(SHARDS):
            assert all(shop.shards.clients[shard].hexists(shop.shards.keys[shard].schedules, jobid)
                       for jobid in jobs[shard])
        shop.bikes[away[0]].control()  # a HALT published on another primary than the subscription's
        thread.join(10)
        assert not thread.is_alive()


def test_every_shards_jobs_run_once_and_continue_jobs_take_turns(shop: Installation,
                                                                running: tuple[WorkerPool, threading.Thread]) -> None:
    """Two slots, four shards, each shard with a CONTINUE job (back in its
    queue as each run ends: a slot finishing it claims it again in the same
    round trip, so a slot that never left a busy shard would hold it for
    ever) and five one-offs. Slots take turns on the shards, so every
    CONTINUE job runs (until all have run a few times) and every one-off
    runs once, each on its own shard; each shard's totals count its own runs."""
    pool, _ = running
    wait_for(lambda: all(any(entry["identity"] == pool.identity for entry in live(shop.client, keys))
                         for keys in shop.shards.keys), what="the pool's registry entry on every shard")
    one_offs = {shard: ids_on(shop.shards, shard, "once", 5) for shard in range(SHARDS)}
    continuing = {shard: ids_on(shop.shards, shard, f"cont-{time.time() + 60!r}", 1)[0] for shard in range(SHARDS)}
    for shard in range(SHARDS):
        shop.set(continuing[shard], "CONTINUE")
        for jobid in one_offs[shard]:
            shop.set(jobid)
    wait_for(lambda: all(shop.status(jobid).startswith("STP:") for jobid in continuing.values()), timeout=20,
             what="every CONTINUE job to run, then stop")
    everything = [jobid for jobs in one_offs.values() for jobid in jobs]
    wait_for(lambda: all(shop.status(jobid).startswith("END:") for jobid in everything), what="every one-off")
    runs = ran(shop.folder)
    assert all(runs[jobid] >= CONTINUE_RUNS for jobid in continuing.values()), runs
    assert all(runs[jobid] == 1 for jobid in everything), runs
    for shard, keys in enumerate(shop.shards.keys):  # each job is known on its own shard only
        assert not any(shop.client.hexists(other.schedules, continuing[shard])
                       for other in shop.shards.keys if other is not keys)

    def counted(shard: int) -> int:
        queue = totals(shop.client, shop.shards.keys[shard]).get("A")
        return queue.runs if queue else 0

    # Sent once each slot goes idle: 5 one-offs and the runs of the CONTINUE job per shard.
    wait_for(lambda: [counted(shard) for shard in range(SHARDS)] == [5 + runs[continuing[shard]] for shard in range(SHARDS)],
             what="each shard's totals to count its runs")


def idle(client: redis.Redis) -> bool:
    """Whether no connection sent a script call for a second or more (the
    slots' claims, and this test's sets, are script calls)."""
    calls = [entry for entry in client.client_list() if entry.get("cmd") in SCRIPT_COMMANDS]
    return bool(calls) and all(int(entry["idle"]) >= 1 for entry in calls)


def test_an_idle_pool_is_woken_by_a_job_set_on_any_shard(shop: Installation,
                                                         running: tuple[WorkerPool, threading.Thread]) -> None:
    """A NOW job set on any shard wakes the idle slots through that shard's queue channel."""
    for shard in (2, 0, 3, 1):
        wait_for(lambda: idle(shop.client), timeout=15, what="the slots to wait (no claim for a second)")
        woken = ids_on(shop.shards, shard, "wake", 1)[0]
        shop.set(woken)
        wait_for(lambda: ran(shop.folder)[woken] == 1, timeout=5, what=f"a job set on shard {shard} to run")  # noqa: B023
        wait_for(lambda: shop.status(woken).startswith("END:"), what="its run to end")  # noqa: B023


def test_a_long_job_is_renewed_on_its_shard_while_the_pool_works_another(
        shop: Installation, running: tuple[WorkerPool, threading.Thread]) -> None:
    long = ids_on(shop.shards, 3, "hold", 1)[0]
    deadlines = shop.shards.keys[3].deadlines
    shop.set(long)
    first = wait_for(lambda: shop.client.zscore(deadlines, long), what="the long job's claim")
    others = ids_on(shop.shards, 0, "once", 6)
    for jobid in others:
        shop.set(jobid)
    # The first deadline is claim time + lease (1.2 s) + grace (2 s): it moves only if the heartbeat renews it there.
    wait_for(lambda: (shop.client.zscore(deadlines, long) or 0) > first + 0.3, what="a renewal on shard 3")  # type: ignore[operator]
    wait_for(lambda: all(shop.status(jobid).startswith("END:") for jobid in others), what="shard 0's jobs")
    assert shop.client.zscore(deadlines, long) is not None  # still running, still held
    shop.release()
    wait_for(lambda: shop.status(long).startswith("END:"), what="the long job to end")
    assert "last_error" not in shop.tell(long)
    assert ran(shop.folder)[long] == 1


def test_a_halt_on_one_shards_control_channel_stops_the_pool(shop: Installation,
                                                             running: tuple[WorkerPool, threading.Thread]) -> None:
    _, thread = running
    jobid = ids_on(shop.shards, 0, "once", 1)[0]
    shop.set(jobid)
    wait_for(lambda: shop.status(jobid).startswith("END:"), what="a first job")  # the pool read the control keys
    shop.bikes[2].control()
    thread.join(10)
    assert not thread.is_alive()


def test_a_halt_found_by_a_claim_on_one_shard_stops_the_pool(shop: Installation,
                                                             running: tuple[WorkerPool, threading.Thread]) -> None:
    """A HALT written to shard 1's control key without its message (a
    lost message): the claim on shard 1 finds it and the pool stops."""
    _, thread = running
    first = ids_on(shop.shards, 1, "once", 2)
    shop.set(first[0])
    wait_for(lambda: shop.status(first[0]).startswith("END:"), what="a first job")  # the pool read the control keys
    shop.client.set(shop.shards.keys[1].control, f"HALT:{int(time.time())}:lost")
    shop.set(first[1])  # its queue channel wakes the slots; their claim on shard 1 finds the HALT
    thread.join(10)
    assert not thread.is_alive()
    assert ran(shop.folder)[first[1]] == 0


def test_a_halt_set_before_the_pool_started_is_not_for_it(shop: Installation) -> None:
    shop.bikes[3].control()
    pool = WorkerPool(shop.client, shop.shards.keys[0], shop.worker, shards=shop.shards)
    thread = threading.Thread(target=pool.run)
    thread.start()
    try:
        jobid = ids_on(shop.shards, 3, "once", 1)[0]
        shop.set(jobid)
        wait_for(lambda: shop.status(jobid).startswith("END:"), what="a job on the shard of the old HALT")
        assert thread.is_alive()
    finally:
        shop.bikes[3].control()
        thread.join(10)
    assert not thread.is_alive()


def test_a_killed_child_has_its_run_ended_on_its_shard(shop: Installation,
                                                       running: tuple[WorkerPool, threading.Thread]) -> None:
    jobid = ids_on(shop.shards, 2, "hold", 1)[0]
    keys = shop.shards.keys[2]
    shop.set(jobid)
    os.kill(shop.pid_of(jobid), signal.SIGKILL)
    wait_for(lambda: "last_error" in shop.tell(jobid), what="its run to be ended")
    told = shop.tell(jobid)
    assert told["last_error"]["status"] == "EXP"
    assert told["last_error"]["error"] == "worker process died (killed by signal 9: SIGKILL)"
    assert not shop.client.hexists(keys.leases, jobid) and shop.client.zscore(keys.deadlines, jobid) is None
    later = ids_on(shop.shards, 2, "once", 1)[0]
    shop.set(later)  # the slot has a new child
    wait_for(lambda: shop.status(later).startswith("END:"), what="the next job")


def test_a_lost_lease_kills_the_run_of_its_shard(shop: Installation,
                                                 running: tuple[WorkerPool, threading.Thread]) -> None:
    """The same job id set on shards 0 and 3 (as only a client that ignores
    the routing would), both running: the lease of the run in slot 1 is
    reaped on its shard (as the dispatcher would: lease gone, an EXP error
    naming the worker). The renewal there finds it lost and kills that run,
    not the other shard's in slot 0, and tell on its shard says so."""
    pool, _ = running
    jobid = "hold-twice:A"
    for shard in (0, 3):
        shop.bikes[shard].set(jobid, "NOW")
    wait_for(lambda: len(pool.board.all_runs()) == 2, what="both runs to start")
    lost, kept = pool.board.runs(1)[0].shard, pool.board.runs(0)[0].shard
    keys = shop.shards.keys[lost]
    lease = str(shop.client.hget(keys.leases, jobid))
    worker, since = lease.split("|")[2], float(lease.split("|")[3])
    with shop.client.pipeline(transaction=True) as pipe:  # the reaper's work, in short
        pipe.hdel(keys.leases, jobid).zrem(keys.deadlines, jobid)
        pipe.hset(keys.errors, jobid, error_record("EXP", f"lease of worker {worker} expired", worker, since + 1))
        pipe.execute()
    wait_for(lambda: "killed" in json.loads(shop.client.hget(keys.errors, jobid) or "{}"),
             what=f"shard {lost}'s run to be killed")
    assert "went on past its lease" in shop.tell(jobid, lost)["last_error"]["killed"]
    assert shop.client.hexists(shop.shards.keys[kept].leases, jobid)  # the other shard's runs on
    shop.release()
    wait_for(lambda: shop.status(jobid, kept).startswith("END:"), what=f"shard {kept}'s run to end")
    assert "last_error" not in shop.tell(jobid, kept)
    assert ran(shop.folder)[jobid] == 2


def test_a_slot_stays_on_its_runs_shard_in_one_round_trip_and_asks_the_others_when_it_has_none(
        shop: Installation) -> None:
    """A slot's claims over four shards, driven one call at a time, every
    script call counted: a finish claims on its own shard in the same round
    trip; only when that shard has no job are the others asked (one claim
    each), and when its turn there is over it gives the others theirs first.
    A slot woken for one shard asks that shard alone."""
    pool = WorkerPool(shop.client, shop.shards.keys[0], shop.worker, shards=shop.shards)
    calls: list[tuple[int, str]] = []
    for shard, space in enumerate(pool.claims.spaces):
        def counted(name: str, *args: object, _run=space.scripts.run, _shard=shard, **kwargs: object) -> object:
            calls.append((_shard, name))
            return _run(name, *args, **kwargs)
        space.scripts.run = counted  # type: ignore[method-assign]
    slot = SlotShards(pool.claims, 0, pool.worker_id(0), [None] * SHARDS)
    first, second = ids_on(shop.shards, 1, "once", 2)
    third, fourth = ids_on(shop.shards, 3, "once", 1)[0], ids_on(shop.shards, 2, "once", 1)[0]
    for jobid in (first, second, third):
        shop.set(jobid)

    def taken(settled: Settled, jobid: str, *made: tuple[int, str]) -> Running:
        assert settled.claimed is not None and settled.claimed.lease.jobid == jobid, settled
        assert calls == list(made), calls
        calls.clear()
        return settled.claimed

    assert slot.claim({0, 2}).claimed is None  # woken for shards without jobs: shard 1's job is not asked for
    assert calls == [(0, "claim"), (2, "claim")]
    calls.clear()
    run = taken(slot.claim({3}), third, (3, "claim"))
    assert run.shard == 3
    # Shard 3 has no more: its tally goes out, then shards 0 and 1 are asked.
    run = taken(slot.finish(run, OK, "", True), first, (3, "finish"), (3, "tally"), (0, "claim"), (1, "claim"))
    assert run.shard == 1
    run = taken(slot.finish(run, OK, "", True), second, (1, "finish"))  # the hot path: one round trip
    shop.set(fourth)
    shop.set(first)  # shard 1 has a job again
    slot.turn_ends = 0.0  # its turn on shard 1 is over: the finish ends the run alone, shard 2 comes first
    taken(slot.finish(run, OK, "", True), fourth, (1, "finish"), (1, "tally"), (2, "claim"))


def test_worker_local_resources_are_counted_across_the_shards(shop: Installation) -> None:
    """A pool with one worker:cpu: a job needing it on shard 0 runs, so the
    one needing it on shard 3 does not fit until that run ends."""
    pool = WorkerPool(shop.client, shop.shards.keys[0], shop.worker, concurrency=2, resources={"cpu": 1},
                      shards=shop.shards)
    slots = [SlotShards(pool.claims, index, pool.worker_id(index), [None] * SHARDS) for index in range(2)]
    here, there = ids_on(shop.shards, 0, "once", 1)[0], ids_on(shop.shards, 3, "once", 1)[0]
    for jobid in (here, there):
        shop.bikes[shop.shards.of(jobid)].set(jobid, "NOW", needs="worker:cpu=1")
    run = slots[0].claim({0}).claimed
    assert run is not None and run.lease.jobid == here and pool.local_used == {"worker:cpu": 1}
    assert slots[1].claim().claimed is None  # every shard asked: shard 3's job does not fit
    assert slots[0].finish(run, OK, "", False).freed and pool.local_used == {"worker:cpu": 0}
    other = slots[1].claim().claimed
    assert other is not None and other.lease.jobid == there and other.shard == 3


def test_a_pool_on_four_shards_costs_one_round_trip_per_job(shop: Installation) -> None:
    """As with one shard (test_pool.test_one_round_trip_per_job): one fused
    finish-and-claim per job, plus a few calls each time a shard runs out
    (its tally, a claim on each other shard) and per turn (a second)."""
    jobs = [jobid for shard in range(SHARDS) for jobid in ids_on(shop.shards, shard, "once", 100)]
    for jobid in jobs:
        shop.set(jobid)
    for source in sources().values():  # loaded already: no NOSCRIPT retry is counted
        shop.client.script_load(source)
    before = script_calls(shop.client)
    pool = WorkerPool(shop.client, shop.shards.keys[0], shop.worker, shards=shop.shards)
    thread = threading.Thread(target=pool.run)
    started = time.monotonic()
    thread.start()
    try:
        wait_for(lambda: pool.jobs_done == len(jobs), timeout=30, what="every job")
        seconds = time.monotonic() - started
    finally:
        pool.halt()
        thread.join(20)
    scripts = script_calls(shop.client) - before
    assert all(shop.status(jobid).startswith("END:") for jobid in jobs)
    assert scripts <= len(jobs) + 3 + SHARDS * (SHARDS + 1) + (SHARDS + 2) * math.ceil(seconds), (scripts, seconds)


def test_a_shard_that_cannot_be_reached_is_passed_over(shop: Installation, caplog: pytest.LogCaptureFixture) -> None:
    """Shard 1's primary lost (its script calls fail): a slot's look passes
    it over, logs it, and claims the job waiting on shard 2; the next look
    asks every shard, even woken for one. Only when every shard fails does
    the error reach the slot (which backs off)."""
    pool = WorkerPool(shop.client, shop.shards.keys[0], shop.worker, shards=shop.shards)
    down: set[int] = {1}
    calls: list[int] = []
    for shard, space in enumerate(pool.claims.spaces):
        def failing(name: str, *args: object, _run=space.scripts.run, _shard=shard, **kwargs: object) -> object:
            calls.append(_shard)
            if _shard in down:
                raise redis.ConnectionError("Connection refused")
            return _run(name, *args, **kwargs)
        space.scripts.run = failing  # type: ignore[method-assign]
    slot = SlotShards(pool.claims, 0, pool.worker_id(0), [None] * SHARDS)
    jobid = ids_on(shop.shards, 2, "once", 1)[0]
    shop.set(jobid)
    with caplog.at_level(logging.WARNING, "redbike"):
        run = slot.claim().claimed
    assert run is not None and run.lease.jobid == jobid and calls == [0, 1, 2]
    assert "slot 0 (shard 1): Redis error" in caplog.text
    calls.clear()
    assert slot.claim({3}).claimed is None and calls == [1, 2, 3, 0]  # every shard, from the next start on
    down.update(range(SHARDS))
    with pytest.raises(redis.ConnectionError):
        slot.claim()
