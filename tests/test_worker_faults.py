"""Real-process tests of how a worker pool reports and survives faults:
what its log says about each run, a lease lost while the pool was stopped,
a stop while Redis is down. Fixtures and helpers as in test_processes.py."""

# ruff: noqa: F811 - the fixtures of test_processes, imported, are taken as arguments

from __future__ import annotations

import os
import signal
import time

from conftest import RedisServer, alive, wait_for, write_config
from test_processes import bike, ends, env, halt, keys, starts  # noqa: F401 - fixtures

from redbike import Redbike, RoundRobin


def test_each_failed_run_is_logged_and_with_v_every_start_and_end(workdir, client, bike, daemons, testlog, env):
    quiet = daemons.start("work", "testworker:Recorder('A')", cwd=workdir)
    verbose = daemons.start("-v", "work", "testworker:Recorder('V')", cwd=workdir)
    bike.set("fail-1:A", "NOW")
    bike.set("fine-1:A", "NOW")
    bike.set("fail-2:V", "NOW")
    bike.set("fine-2:V", "NOW")
    wait_for(lambda: len(ends(client, testlog)) == 4, what="the four runs")
    line = wait_for(lambda: [ln for ln in daemons.log(quiet).splitlines() if "fail-1:A" in ln], what="the failure line")
    assert len(line) == 1, line
    assert " WARNING job fail-1:A: failed after " in line[0]
    assert line[0].endswith("s: ValueError: fail-1:A failed on purpose")
    assert "fine-1:A" not in daemons.log(quiet)  # start and end lines are DEBUG
    wait_for(lambda: "job fine-2:V: ended (ok) after " in daemons.log(verbose), what="the end line")
    log = daemons.log(verbose)
    assert "DEBUG job fine-2:V: started (queue V, worker " in log
    assert "WARNING job fail-2:V: failed after " in log and "ValueError: fail-2:V failed on purpose" in log
    assert "Traceback" in log  # the failure's traceback too, at DEBUG
    halt(workdir, env, quiet, verbose)


def test_a_run_whose_lease_was_lost_is_killed_at_once(tmp_path, redis_server, client, prefix, keys, bike,
                                                      daemons, testlog, env):
    """A worker stopped (SIGSTOP) past its lease's deadline: the dispatcher
    reaps the lease and another worker starts the job. When the first one
    resumes, its heartbeat finds the lease gone and kills its copy at once;
    tell says so. Leases last 15 s + 2 s grace, so the job (timeout 120 s) is
    renewed, and the stop lasts until the second worker has started it."""
    home = write_config(tmp_path / "home", prefix, redis_server.url, worker="testworker:Recorder('A')", default_timeout=120)
    dispatcher = daemons.start("dispatch", cwd=home)
    first = daemons.start("work", cwd=home)
    bike.set("sleep60-lost:A", "NOW")
    started = wait_for(lambda: starts(client, testlog, "sleep60-lost:A"), what="the first run")[0]
    # The whole worker frozen: the supervisor and its zygote, and the job's
    # child, which leads a process group of its own.
    frozen = (first.pid, started["pid"])
    for group in frozen:
        os.killpg(group, signal.SIGSTOP)
    try:
        second = daemons.start("work", cwd=home)
        again = wait_for(lambda: [r for r in starts(client, testlog, "sleep60-lost:A") if r["token"] != started["token"]],
                         timeout=45, what="the dispatcher to reap the lease and the second worker to start the job")[0]
        assert alive(started["pid"])  # stopped, not dead
    finally:
        resumed = time.monotonic()
        # The job's child first: the supervisor, resumed, may kill it at once.
        for group in reversed(frozen):
            os.killpg(group, signal.SIGCONT)
    # Its heartbeat's wait ran out during the stop: it renews at once, finds
    # the lease gone and kills the child through its pidfd; a second is ample.
    wait_for(lambda: not alive(started["pid"]), timeout=10, what="the first copy to be killed")
    assert time.monotonic() - resumed < 2.0
    assert ends(client, testlog, "sleep60-lost:A") == []  # neither copy ended; the first never will
    assert first.poll() is None and second.poll() is None and dispatcher.poll() is None
    lease = client.hget(keys.leases, "sleep60-lost:A")
    assert lease.startswith(again["token"] + "|")  # the second run goes on
    told = wait_for(lambda: "killed" in (bike.tell("sleep60-lost:A") or {}).get("last_error", {}) and
                    bike.tell("sleep60-lost:A"), what="tell to say the first copy was killed")
    assert told["last_error"]["status"] == "EXP" and "lease expired" in told["last_error"]["error"]
    assert "went on past its lease; killed" in told["last_error"]["killed"]
    assert "killed: its lease was lost" in daemons.log(first)


def test_a_second_signal_stops_a_worker_while_redis_is_down(tmp_path, client, prefix, keys, daemons, testlog, env):
    """Redis goes down while a job runs; work() completes but cannot be
    reported. SIGTERM, then SIGTERM again: the worker exits within seconds,
    leaves the lease to the dispatcher's reaper and counts one job. Back up,
    Redis holds the job as the worker left it: running, no false EXP."""
    folder = tmp_path / "own-redis"
    folder.mkdir()
    server = RedisServer(folder)  # a server of its own, saved to disk and restarted
    server.start()
    try:
        home = write_config(tmp_path / "home", prefix, server.url, worker="testworker:Recorder('A')")
        worker = daemons.start("work", cwd=home)
        own = server.client()
        Redbike(RoundRobin(), prefix=prefix, client=own).set("sleep1-down:A", "NOW")
        wait_for(lambda: starts(client, testlog, "sleep1-down:A"), what="the run to start")
        own.shutdown(save=True)
        assert server.process is not None and server.process.wait(10) == 0
        wait_for(lambda: ends(client, testlog, "sleep1-down:A"), what="work() to complete")
        wait_for(lambda: "slot 0: Redis error" in daemons.log(worker), what="the run's report to fail")
        worker.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping after the running jobs" in daemons.log(worker), what="the first SIGTERM")
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
        assert time.monotonic() - signalled < 3.0  # no wait for Redis
        log = daemons.log(worker)
        assert "job sleep1-down:A: its run ended, but Redis is unreachable" in log
        assert "its lease is left to the dispatcher's reaper" in log
        assert "stopped after 1 job(s)" in log
        assert log.count("slot 0: Redis error") == 1  # once, not on every retry
        server.start()
        own = server.client()
        assert own.hget(keys.statuses, "sleep1-down:A").startswith("WRK:")  # as it was left: the reaper's to end
        assert own.hget(keys.leases, "sleep1-down:A") is not None
        assert own.hget(keys.errors, "sleep1-down:A") is None  # not "killed: stopped by force"
    finally:
        server.stop()
