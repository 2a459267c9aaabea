"""Clock skew between hosts: a worker whose clock is 20 s behind the dispatcher's
(Debian's libfaketime shifts it) must not have its leases reaped as soon as it
takes them, so every job runs once, with no overlap and no EXP."""

from __future__ import annotations

import glob
import time

import test_processes
from conftest import Daemons, wait_for
from test_processes import halt, leads, starts, status_of

from redbike import Redbike, RoundRobin

SKEW = "-20s"
# The faketime package (apt-get install faketime); CI installs it. Missing is a failure.
LIBFAKETIME = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")

env, keys = test_processes.env, test_processes.keys  # daemons and testlog come from conftest


def test_a_worker_20s_behind_runs_each_job_once(workdir, tmp_path, client, prefix, keys, daemons,
                                                  testlog, env):
    assert LIBFAKETIME, "libfaketime is missing: apt-get install faketime"
    logs = tmp_path / "skewed-logs"
    logs.mkdir()
    skewed = Daemons(logs, dict(env, LD_PRELOAD=LIBFAKETIME[0], FAKETIME=SKEW))
    try:
        dispatcher = daemons.start("dispatch", cwd=workdir)
        worker = skewed.start("work", "--concurrency=3", cwd=workdir)
        wait_for(lambda: leads(client, keys), what="the dispatcher to lead")
        bike = Redbike(RoundRobin(), prefix=prefix, client=client)
        # Longer than a lease's grace (2 s) beyond the skew's reach: each would be reaped.
        jobs = [f"sleep3-skew{i}:A" for i in range(3)]
        for job in jobs:
            bike.set(job, "NOW")
        wait_for(lambda: all(status_of(client, keys, job) == "END" for job in jobs), timeout=30,
                 what="every job to end")
        halt(workdir, env, dispatcher, worker)
    finally:
        skewed.cleanup()
    first = starts(client, testlog)[0]
    assert first["at"] < time.time() - 15, "the worker's clock was not skewed"
    assert sorted(run["job"] for run in starts(client, testlog)) == jobs  # once each: no overlap
    assert client.hlen(keys.errors) == 0, client.hgetall(keys.errors)  # no EXP
