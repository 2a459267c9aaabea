"""The worker pool in-process against a real Redis server: round trips per
job, no prefetch, heartbeats for long jobs; and the demo."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import redis
from conftest import ROOT, script_calls, server_binary, wait_for
from servers import Server

from redbike import Redbike, RoundRobin
from redbike.dispatcher import Dispatcher
from redbike.embedded import stop_server
from redbike.scripts import sources
from redbike.supervisor import WorkerPool


class Noop(RoundRobin):
    def work(self, jobid: str) -> None:
        return None


class Sleeper(RoundRobin):
    """Busy-loops (holding its own GIL) for the seconds named in the job id."""

    def timeout(self, queue_name: str) -> float | None:
        return 60

    def work(self, jobid: str) -> None:
        until = time.monotonic() + float(jobid.split(":")[0].split("-")[1])
        while time.monotonic() < until:
            pass


def start(pool: WorkerPool) -> threading.Thread:
    thread = threading.Thread(target=pool.run)
    thread.start()
    return thread


def test_one_round_trip_per_job(client: redis.Redis, prefix: str) -> None:
    worker = Noop("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    jobs = 300
    for number in range(jobs):
        bike.set(f"job{number}:A", "NOW")
    for source in sources().values():  # loaded already, as in a long-running Redis: no NOSCRIPT retry is counted
        client.script_load(source)
    before = script_calls(client)
    pool = WorkerPool(client, bike.keys, worker)
    thread = start(pool)
    try:
        wait_for(lambda: client.llen(bike.keys.queue("A")) == 0 and not client.hlen(bike.keys.leases),
                 what="the queue to drain")
    finally:
        bike.control()
        thread.join(10)
    scripts = script_calls(client) - before
    assert pool.jobs_done == jobs
    assert all(event == "END" for _, event, _ in bike.statuses())
    # One fused finish-and-claim per job, plus the first claim and the last
    # empty claim: no second round trip per job.
    assert scripts <= jobs + 3, scripts


def test_no_prefetch_each_slot_holds_one_job(client: redis.Redis, prefix: str) -> None:
    worker = Sleeper("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    for number in range(6):
        bike.set(f"sleep-0.3-{number}:A", "NOW")
    pool = WorkerPool(client, bike.keys, worker, concurrency=2)
    thread = start(pool)
    seen_leases = set()
    try:
        def drained() -> bool:
            with client.pipeline(transaction=True) as pipe:  # one snapshot of both
                leases, queued = pipe.hlen(bike.keys.leases).llen(bike.keys.queue("A")).execute()
            seen_leases.add(leases)
            # Every job is queued, leased by one of the 2 slots, or done (a slot
            # counts a run as done just before the script that ends it).
            assert leases <= 2
            assert queued + leases + pool.jobs_done >= 6
            return pool.jobs_done == 6
        wait_for(drained, timeout=20, what="six jobs")
    finally:
        bike.control()
        thread.join(10)
    assert 2 in seen_leases


def test_heartbeats_keep_a_long_job_alive(client: redis.Redis, prefix: str) -> None:
    """A job running well past its lease is renewed by the supervisor (while
    the child hogs its CPU) and is not reaped by a running dispatcher."""
    worker = Sleeper("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    bike.set("sleep-4:A", "NOW")
    pool = WorkerPool(client, bike.keys, worker, lease_seconds=1.2)
    dispatcher = Dispatcher(client, bike.keys, worker.queue_for)
    threads = [start(pool), threading.Thread(target=dispatcher.run)]
    threads[1].start()
    try:
        first = wait_for(lambda: client.zscore(bike.keys.deadlines, "sleep-4:A"), what="the claim")
        # The first deadline is claim time + lease (1.2 s) + grace (2 s): the
        # job outlives it only if heartbeats move it.
        renewed = wait_for(
            lambda: (client.zscore(bike.keys.deadlines, "sleep-4:A") or 0) > first + 0.3,
            what="a heartbeat",
        )
        assert renewed
        wait_for(lambda: pool.jobs_done == 1, timeout=15, what="the job to end")
    finally:
        bike.control()
        for thread in threads:
            thread.join(10)
    assert bike.tell("sleep-4:A")["status"].startswith("END:")
    assert dispatcher.reaped == 0
    assert "last_error" not in bike.tell("sleep-4:A")


def test_demo_runs_on_the_embedded_server(tmp_path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "redbike", "demo", "--seconds", "3"],
            check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )
    finally:
        stop_server(str(tmp_path / ".redbike"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo OK" in done.stdout
    assert "ran hello:A" in done.stdout
    assert "embedded Redis" in done.stderr
    assert (tmp_path / ".redbike" / "redis.sock").exists() is False  # stopped


def test_a_flushed_script_cache_is_reloaded_on_the_hot_path(client: redis.Redis, prefix: str) -> None:
    """The children send EVALSHA straight on their connections: after SCRIPT
    FLUSH (or a server restart) they load the script again and go on."""
    worker = Noop("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker)
    thread = start(pool)
    try:
        bike.set("before:A", "NOW")
        wait_for(lambda: pool.jobs_done == 1, what="the first job")
        client.script_flush()
        bike.set("after:A", "NOW")  # Redbike.set loads its own script again
        wait_for(lambda: pool.jobs_done == 2, what="a job after SCRIPT FLUSH")
        wait_for(lambda: {job: event for job, event, _ in bike.statuses()}.get("after:A") == "END",
                 what="its run to be ended")
    finally:
        bike.control()
        thread.join(10)
    assert not thread.is_alive()


def test_daemons_whose_first_commands_find_redis_down_wait_for_it(tmp_path, prefix: str, caplog) -> None:
    """A Redis restart right after a daemon found Redis up used to hit its
    first commands (the control key, the subscription), and the daemon died
    (the fault campaign, seed 509134): they are now retried as its loops
    retry, and the daemon goes on once Redis is back."""
    server = Server(tmp_path / "redis", [], command=[server_binary()])  # not started: its port refuses
    client = redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
    worker = Noop("A")
    keys = Redbike(worker, prefix=prefix, client=client).keys
    pool = WorkerPool(client, keys, worker)
    dispatcher = Dispatcher(client, keys, worker.queue_for)
    threads = [start(pool), threading.Thread(target=dispatcher.run)]
    threads[1].start()
    try:
        wait_for(lambda: f"worker {pool.identity}: Redis error" in caplog.text
                 and f"dispatcher {dispatcher.identity}: Redis error" in caplog.text, what="both to find Redis down")
        assert all(thread.is_alive() for thread in threads)
        server.start()
        bike = Redbike(worker, prefix=prefix, client=server.client())
        bike.set("after:A", "NOW")
        wait_for(lambda: pool.jobs_done == 1, timeout=20, what="the worker to run the job set once Redis was up")
        wait_for(lambda: dispatcher.token is not None, what="the dispatcher to lead")
        bike.control()
        for thread in threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        dispatcher.stop()
        pool.stop()
        server.kill()
