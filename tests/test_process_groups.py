"""Real-process tests: a killed run takes down what its job started. Each
slot's child leads a process group of its own; when it is killed (timeout,
second signal, from outside, the supervisor dying by SIGKILL) the whole
group is killed; a graceful stop leaves a finished job's detached work alone.

The jobs are testworker's ``spawn-...`` (two ``sleep 1000``, then it hangs)
and ``detach-...`` (one, then it returns), their processes marked in their
environment with the job id and found here through /proc."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any, cast

import redis
from conftest import Daemons, alive, wait_for
from testworker import Recorder

from redbike import Redbike, RoundRobin
from redbike.supervisor import WorkerPool


def marked(mark: str) -> list[int]:
    """The live processes whose environment has REDBIKE_TEST_MARK=``mark``."""
    wanted = f"REDBIKE_TEST_MARK={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if wanted in environment and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def kill_marked(mark: str) -> None:
    """Leave nothing behind, whatever the test found."""
    for pid in marked(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def started(mark: str) -> list[int]:
    """Wait for the two sleeps of job ``mark``; their pids."""
    return cast(list[int], wait_for(lambda: len(found := marked(mark)) == 2 and found, what="the job's two sleeps"))


def last_error(bike: Redbike, jobid: str) -> Any:
    return (bike.tell(jobid) or {}).get("last_error")


def start(pool: WorkerPool) -> threading.Thread:
    thread = threading.Thread(target=pool.run)
    thread.start()
    return thread


def test_a_job_killed_for_its_timeout_leaves_no_process_behind(client: redis.Redis, prefix: str) -> None:
    worker = Recorder("T")  # a 2 s timeout
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker)
    jobid = f"spawn-{prefix}:T"
    thread = start(pool)
    try:
        bike.set(jobid, "NOW")
        assert all(alive(pid) for pid in started(jobid))
        error = wait_for(lambda: last_error(bike, jobid), timeout=10, what="the job to be killed at its timeout")
        assert error["error"] == "killed: timed out after 2s"
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to be killed with it")
    finally:
        bike.control()  # HALT
        thread.join(20)
        kill_marked(jobid)
    assert not thread.is_alive()


def test_a_second_signal_kills_what_the_running_job_started(client: redis.Redis, prefix: str) -> None:
    worker = Recorder("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker, default_timeout=60)
    jobid = f"spawn-{prefix}:A"
    thread = start(pool)
    try:
        bike.set(jobid, "NOW")
        started(jobid)
        pool.stop()  # as the signal handler does: first, finish the running job...
        pool.stop()  # ...then kill it
        thread.join(20)
        assert not thread.is_alive()
        assert last_error(bike, jobid)["error"] == "killed: stopped by force"
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to be killed with it")
    finally:
        bike.control()
        thread.join(20)
        kill_marked(jobid)


def test_a_child_killed_from_outside_takes_its_group_with_it(client: redis.Redis, prefix: str) -> None:
    """As the OOM killer would: the child dies, not killed by its supervisor."""
    worker = Recorder("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker, default_timeout=60)
    jobid = f"spawn-{prefix}:A"
    thread = start(pool)
    try:
        bike.set(jobid, "NOW")
        started(jobid)
        os.kill(pool.children[0].pid, signal.SIGKILL)
        error = wait_for(lambda: last_error(bike, jobid), what="the run to end")
        assert error["error"] == "worker process died (killed by signal 9: SIGKILL)"
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to be killed with it")
    finally:
        bike.control()
        thread.join(20)
        kill_marked(jobid)


def test_a_graceful_stop_leaves_a_finished_jobs_detached_process(client: redis.Redis, prefix: str) -> None:
    """The slot's child exits cleanly: its group is not killed."""
    worker = Recorder("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker)
    jobid = f"detach-{prefix}:A"
    thread = start(pool)
    try:
        bike.set(jobid, "NOW")
        wait_for(lambda: pool.jobs_done == 1, what="the job to end")
        detached = wait_for(lambda: marked(jobid), what="its sleep")
        bike.control()  # HALT
        thread.join(20)
        assert not thread.is_alive()
        assert marked(jobid) == detached
    finally:
        bike.control()
        thread.join(20)
        kill_marked(jobid)


def test_a_worker_killed_by_sigkill_leaves_no_process_behind(workdir: Path, client: redis.Redis, prefix: str,
                                                             daemons: Daemons, testlog: str) -> None:
    """The supervisor dies by SIGKILL, alone: its zygote sees its socket
    close and kills each slot's child and group."""
    worker = daemons.start("work", "testworker:Recorder('A')", cwd=workdir)
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    jobid = f"spawn-{prefix}:A"
    try:
        bike.set(jobid, "NOW")
        started(jobid)
        child = json.loads(client.lindex(testlog, 0))["pid"]  # type: ignore[arg-type]
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(5) == -signal.SIGKILL
        wait_for(lambda: not alive(child), timeout=5, what="the job's child to die with its supervisor")
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to die with it")
    finally:
        kill_marked(jobid)
