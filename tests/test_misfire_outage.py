"""Real-process test of the misfire policies across a real dispatcher outage
(issue #8): three every-minute cron jobs, under once, skip (grace 10 s) and
all:2, while the only dispatcher is stopped for just over 3 minutes of real
time. Slow (about 4 minutes): marked ``slow``.

The expected counts are computed from the minute boundaries that actually fell
in the outage (Redis TIME when the dispatcher stopped and when it started
again), and the test picks its moment so that no boundary is near either end.
"""

from __future__ import annotations

import math
import signal
import time

import pytest
import redis
from conftest import wait_for
from test_failures import configure, ordered_runs, run_events, tell
from test_processes import EXIT_TIMEOUT, cli_ok, leads, status_of

from redbike.keys import Keys

OUTAGE = 185.0  # seconds the dispatcher is down: three minute boundaries pass
JOBS = {"cron-once:A": ["--misfire=once"], "cron-skip:A": ["--misfire=skip", "--grace=10"],
        "cron-all2:A": ["--misfire=all:2"]}


def redis_time(client: redis.Redis) -> float:
    seconds, microseconds = client.time()
    return seconds + microseconds / 1e6


@pytest.mark.slow
def test_a_cron_job_across_a_three_minute_dispatcher_outage(workdir, client, prefix, daemons, testlog, process_env):
    keys = Keys(prefix)
    configure(workdir, trail_length=50)
    daemons.start("work", cwd=workdir)
    dispatcher = daemons.start("dispatch", cwd=workdir)
    wait_for(lambda: leads(client, keys), what="the dispatcher to lead")
    for jobid, options in JOBS.items():
        cli_ok(workdir, process_env, "set", jobid, "* * * * *", *options)

    # Stop it between seconds 10 and 30 of a minute: the runs of the boundary
    # before have ended, the next boundary is far, and so (185 s later) is
    # the restart's.
    wait_for(lambda: 10 <= redis_time(client) % 60 <= 30 and all(
        status_of(client, keys, jobid) == "TML" for jobid in JOBS), timeout=90,
             what="seconds 10 to 30 of a minute, every job waiting in the timeline")
    before = {jobid: tell(workdir, process_env, jobid) for jobid in JOBS}
    ran_before = {jobid: len(ordered_runs(client, testlog, jobid)) for jobid in JOBS}
    dispatcher.send_signal(signal.SIGTERM)
    assert dispatcher.wait(EXIT_TIMEOUT) == 0
    stopped = redis_time(client)
    first_missed = math.ceil(stopped / 60) * 60
    for jobid in JOBS:
        assert before[jobid]["next_run"] == first_missed, (jobid, before[jobid], stopped)

    time.sleep(OUTAGE)  # the outage itself (real time, not a stand-in for a condition)
    wait_for(lambda: redis_time(client) >= stopped + OUTAGE, what="the outage to last its time")
    restarted = redis_time(client)
    daemons.start("dispatch", cwd=workdir)
    missed = [float(m) for m in range(int(first_missed), int(restarted) + 1, 60)]
    following = missed[-1] + 60  # the first occurrence after the outage
    assert following - restarted > 15, "the restart is too near a minute boundary"
    k = len(missed)
    assert k == 3, (stopped, restarted, missed)

    def new_runs(jobid: str) -> list[dict]:
        return ordered_runs(client, testlog, jobid)[ran_before[jobid]:]

    def ledger(jobid: str) -> dict[str, int]:
        now, then = tell(workdir, process_env, jobid)["ledger"], before[jobid]["ledger"]
        return {name: now[name] - then[name] for name in ("fired", "coalesced", "skipped", "cancelled")}

    wait_for(lambda: len(new_runs("cron-once:A")) >= 1 and len(new_runs("cron-all2:A")) >= 2
             and all(status_of(client, keys, jobid) == "TML" for jobid in JOBS)
             and all(run["end"] for jobid in JOBS for run in new_runs(jobid)),
             timeout=30, what="the catch-up runs to end")
    wait_for(lambda: ledger("cron-skip:A")["skipped"] > 0, timeout=30, what="the skip job's ledger")
    assert all(run["start"] < following for jobid in JOBS for run in new_runs(jobid)), "caught up too late"

    def dues(jobid: str) -> list[float]:
        """The occurrences of the job's runs since the restart, in the order they ran."""
        tokens = {run["token"] for run in new_runs(jobid)}
        return [float(event.fields["due"]) for event in run_events(client, keys, jobid)
                if event.fields["token"] in tokens]

    # once: one run, for the latest missed occurrence; the others coalesced into it.
    assert len(new_runs("cron-once:A")) == 1
    assert dues("cron-once:A") == missed[-1:]
    assert ledger("cron-once:A") == {"fired": 1, "coalesced": k - 1, "skipped": 0, "cancelled": 0}
    # skip (grace 10 s): every missed occurrence is more than 10 s late: none runs.
    assert new_runs("cron-skip:A") == []
    assert ledger("cron-skip:A") == {"fired": 0, "coalesced": 0, "skipped": k, "cancelled": 0}
    # all:2: the two latest run, oldest first; the rest skipped.
    assert len(new_runs("cron-all2:A")) == 2
    assert dues("cron-all2:A") == missed[-2:]
    assert ledger("cron-all2:A") == {"fired": 2, "coalesced": 0, "skipped": k - 2, "cancelled": 0}
    # And each waits for the first occurrence after the outage.
    for jobid in JOBS:
        told = tell(workdir, process_env, jobid)
        assert told["next_run"] == following, (jobid, told)
        if jobid != "cron-skip:A":
            assert told["ledger"]["last_due"] == missed[-1], (jobid, told)
