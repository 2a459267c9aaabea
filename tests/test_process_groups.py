"""Real-process tests: a killed run takes down what its job started. Each
slot's child leads a process group of its own; when it is killed (timeout,
second signal, from outside, the supervisor dying by SIGKILL) the whole
group is killed; a graceful stop leaves a finished job's detached work alone;
Ctrl-C in a terminal reaches the supervisor, not the job.

The jobs are testworker's ``spawn-...`` (two ``sleep 1000``, then it hangs)
and ``detach-...`` (one, then it returns), their processes marked in their
environment with the job id and found here through /proc."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import redis
from conftest import Daemons, alive, processes_with, wait_for
from testworker import Recorder

from redbike import Redbike, RoundRobin
from redbike.supervisor import WorkerPool


def marked(mark: str) -> list[int]:
    """The live processes whose environment has REDBIKE_TEST_MARK=``mark``."""
    return processes_with("REDBIKE_TEST_MARK", mark)


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


@contextlib.contextmanager
def pool_running(client: redis.Redis, prefix: str, jobid: str, queue: str,
                 **settings: Any) -> Iterator[tuple[Redbike, WorkerPool, threading.Thread]]:
    """A pool of queue ``queue`` running in a thread, stopped (HALT) at the
    end, and whatever job ``jobid`` started killed, whatever the test did."""
    worker = Recorder(queue)
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker, **settings)
    thread = threading.Thread(target=pool.run)
    thread.start()
    try:
        yield bike, pool, thread
    finally:
        bike.control()  # HALT
        thread.join(20)
        kill_marked(jobid)


def test_a_job_killed_for_its_timeout_leaves_no_process_behind(client: redis.Redis, prefix: str) -> None:
    jobid = f"spawn-{prefix}:T"
    with pool_running(client, prefix, jobid, "T") as (bike, _, thread):  # queue T: a 2 s timeout
        bike.set(jobid, "NOW")
        assert all(alive(pid) for pid in started(jobid))
        error = wait_for(lambda: last_error(bike, jobid), timeout=10, what="the job to be killed at its timeout")
        assert error["error"] == "killed: timed out after 2s"
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to be killed with it")
    assert not thread.is_alive()


def test_a_second_signal_kills_what_the_running_job_started(client: redis.Redis, prefix: str) -> None:
    jobid = f"spawn-{prefix}:A"
    with pool_running(client, prefix, jobid, "A", default_timeout=60) as (bike, pool, thread):
        bike.set(jobid, "NOW")
        started(jobid)
        pool.stop()  # as the signal handler does: first, finish the running job...
        pool.stop()  # ...then kill it
        thread.join(20)
        assert not thread.is_alive()
        assert last_error(bike, jobid)["error"] == "killed: stopped by force"
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to be killed with it")


def test_a_child_killed_from_outside_takes_its_group_with_it(client: redis.Redis, prefix: str) -> None:
    """As the OOM killer would: the child dies, not killed by its supervisor."""
    jobid = f"spawn-{prefix}:A"
    with pool_running(client, prefix, jobid, "A", default_timeout=60) as (bike, pool, _):
        bike.set(jobid, "NOW")
        started(jobid)
        os.kill(pool.children[0].pid, signal.SIGKILL)
        error = wait_for(lambda: last_error(bike, jobid), what="the run to end")
        assert error["error"] == "worker process died (killed by signal 9: SIGKILL)"
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to be killed with it")


def test_a_graceful_stop_leaves_a_finished_jobs_detached_process(client: redis.Redis, prefix: str) -> None:
    """The slot's child exits cleanly: its group is not killed."""
    jobid = f"detach-{prefix}:A"
    with pool_running(client, prefix, jobid, "A") as (bike, pool, thread):
        bike.set(jobid, "NOW")
        wait_for(lambda: pool.jobs_done == 1, what="the job to end")
        detached = wait_for(lambda: marked(jobid), what="its sleep")
        bike.control()  # HALT
        thread.join(20)
        assert not thread.is_alive()
        assert marked(jobid) == detached


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


# A shell without job control in a terminal: the leader of a new session
# whose controlling terminal is its stdin; it runs its arguments as a Python
# command in its own (the foreground) group, ignores Ctrl-C while it waits,
# prints how the command exited, then waits for a line before it ends (a
# session leader's end would hang up the terminal: SIGHUP to its group).
TERMINAL_SHELL = """
import fcntl, os, signal, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("exited", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
sys.stdin.readline()
"""


def test_ctrl_c_in_a_terminal_reaches_the_supervisor_not_the_job(workdir: Path, client: redis.Redis, prefix: str,
                                                                 process_env: dict[str, str], tmp_path: Path) -> None:
    """The worker in the foreground of a terminal: the first Ctrl-C lets the
    running job go on, with what it started (out of the terminal's reach, in
    the job's own group); the second kills them all, and the worker exits."""
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    jobid = f"spawn-{prefix}:A"
    master, terminal = pty.openpty()
    log = tmp_path / "terminal.log"
    with open(log, "wb") as output:
        shell = subprocess.Popen([sys.executable, "-c", TERMINAL_SHELL, "-m", "redbike", "work", "testworker:Recorder('A')"],
                                 cwd=workdir, env=process_env, stdin=terminal, stdout=output, stderr=subprocess.STDOUT)
    os.close(terminal)
    try:
        bike.set(jobid, "NOW")
        sleeps = started(jobid)
        os.write(master, b"\x03")  # Ctrl-C: SIGINT to the terminal's foreground group
        wait_for(lambda: "stopping after the running jobs" in log.read_text(), what="the first Ctrl-C")
        assert marked(jobid) == sleeps and "exited" not in log.read_text()
        os.write(master, b"\x03")
        wait_for(lambda: "exited 0" in log.read_text(), what="the worker to exit")
        assert last_error(bike, jobid)["error"] == "killed: stopped by force"
        wait_for(lambda: not marked(jobid), timeout=5, what="the job's sleeps to be killed with it")
        os.write(master, b"\n")
        assert shell.wait(5) == 0
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
        os.close(master)
        kill_marked(jobid)
