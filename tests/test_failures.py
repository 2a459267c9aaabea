"""Real-process tests of issue #8's failure handling and occurrences:
retries with backoff, a job that always overruns its timeout, `tell` of a
past-due queued job and the `retry` command.

As in test_processes.py, `redbike dispatch` and `redbike work` run as
subprocesses against the session's redis-server, every run is recorded by
tests/testworker.py's Recorder (start and end, with the run's lease token) and
the assertions are made on those records, on `tell` and on each job's trail
(records.TrailEvent: a "run" event per finished run gives the occurrence it
was for, its attempt, the status it ended in and, when it went back to the
timeline, when it runs next).
"""

from __future__ import annotations

import json
import re
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import wait_for, write_config
from test_processes import cli, cli_ok, records, runs, starts, status_of

from redbike.keys import Keys
from redbike.records import TrailEvent, decode_trail_event, trail_of
from redbike.schedules import parse_schedule

SLACK = 1.5  # seconds a retry may start after its backoff: the dispatcher's move, the claim


# --------------------------------------------------------------------- helpers


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


def configure(workdir: Path, **settings: object) -> None:
    """Set keys of the [redbike] stanza of workdir's .redbike.conf (``retry_backoff``
    for retry-backoff), replacing those write_config wrote."""
    path = workdir / ".redbike.conf"
    lines = path.read_text().splitlines()
    names = {name.replace("_", "-"): value for name, value in settings.items()}
    lines = [line for line in lines if line.split("=", 1)[0].strip() not in names]
    at = lines.index("[redbike]") + 1
    lines[at:at] = [f"{name} = {value}" for name, value in names.items()]
    path.write_text("\n".join(lines) + "\n")


def trail(client: redis.Redis, keys: Keys, jobid: str) -> list[TrailEvent]:
    return [decode_trail_event(value) for value in trail_of(client.hget(keys.jobs, jobid))]


def run_events(client: redis.Redis, keys: Keys, jobid: str) -> list[TrailEvent]:
    """The job's finished runs, oldest first."""
    return [event for event in trail(client, keys, jobid) if event.event == "run"]


def tell(workdir: Path, env: dict[str, str], jobid: str) -> dict[str, Any]:
    return json.loads(cli_ok(workdir, env, "tell", jobid))


def ordered_runs(client: redis.Redis, testlog: str, jobid: str) -> list[dict[str, Any]]:
    """The job's runs as the test worker recorded them, by start time (with their token)."""
    found = [dict(run, token=token) for token, run in runs(records(client, testlog)).items() if run["job"] == jobid]
    return sorted(found, key=lambda run: run["start"])


# ------------------------------------------------------------ retries, backoff


def test_retries_back_off_exponentially_with_full_jitter_up_to_the_cap(workdir, client, keys, daemons, testlog,
                                                                        process_env):
    """retries=4, retry-backoff=1, retry-backoff-max=2: 5 attempts, then DIE;
    the wait after failed attempt n is drawn from 0..min(2, 1 * 2**(n-1))."""
    backoff, cap, retries = 1.0, 2.0, 4
    configure(workdir, retry_backoff=f"{backoff:g}", retry_backoff_max=f"{cap:g}", trail_length=50)
    jobs = [f"fail-backoff{i}:A" for i in range(4)]  # four of them: more draws of the jitter
    daemons.start("work", cwd=workdir)  # no dispatcher yet: a retry waits in the timeline
    for jobid in jobs:
        cli_ok(workdir, process_env, "set", jobid, "NOW", f"--retries={retries}")
    wait_for(lambda: all(status_of(client, keys, jobid) == "RTY" for jobid in jobs), timeout=30,
             what="every job to fail its first attempt")
    assert all(len(starts(client, testlog, jobid)) == 1 for jobid in jobs)

    told = tell(workdir, process_env, jobs[0])
    assert told["event"] == "RTY" and told["status"].startswith("RTY:")
    assert told["attempt"] == 2, told  # the attempt it waits to make
    assert told["retries"] == retries, told
    assert told["last_error"]["status"] == "RTY", told
    assert f"ValueError: {jobs[0]} failed on purpose" in told["last_error"]["error"], told
    assert told["next_run"] is not None and told["next_run"] <= told["since"] + backoff + 1, told

    daemons.start("dispatch", cwd=workdir)
    wait_for(lambda: client.exists(keys.dispatcher), what="the dispatcher to lead")
    led = time.time()  # a retry due before this waited for the dispatcher, not for its backoff alone
    wait_for(lambda: all(status_of(client, keys, jobid) == "DIE" for jobid in jobs), timeout=90,
             what="every job to use up its retries")

    ceilings = [min(cap, backoff * 2 ** (n - 1)) for n in range(1, retries + 1)]  # 1, 2, 2, 2
    delays: list[list[float]] = []
    for jobid in jobs:
        done = ordered_runs(client, testlog, jobid)
        assert len(done) == retries + 1, done
        assert all(run["end"] is not None for run in done), done
        finished = run_events(client, keys, jobid)
        assert [event.fields["attempt"] for event in finished] == [str(n) for n in range(1, retries + 2)]
        assert [event.fields["status"] for event in finished] == ["RTY"] * retries + ["DIE"]
        assert [event.fields["token"] for event in finished] == [run["token"] for run in done]
        # The backoff each failure chose (next run - finish), and the gaps the worker saw.
        chosen = [float(event.fields["next_at"]) - event.at for event in finished[:-1]]
        assert all(0 <= delay <= ceiling + 1e-3 for delay, ceiling in zip(chosen, ceilings)), (chosen, ceilings)
        gaps = [later["start"] - earlier["end"] for earlier, later in pairwise(done)]
        waited = [max(0.0, led - earlier["end"]) for earlier in done[:-1]]  # for the dispatcher to start
        assert all(delay - 0.05 <= gap <= max(ceiling, wait) + SLACK
                   for gap, delay, ceiling, wait in zip(gaps, chosen, ceilings, waited)), (gaps, chosen, ceilings)
        assert all(gap <= max(cap, wait) + SLACK for gap, wait in zip(gaps, waited)), (gaps, waited)
        delays.append(chosen)
        told = tell(workdir, process_env, jobid)
        assert told["last_error"]["status"] == "DIE" and "failed on purpose" in told["last_error"]["error"]

    drawn = [delay for chosen in delays for delay in chosen]
    # Full jitter: the waits differ, and are not just the ceilings.
    assert max(drawn) - min(drawn) > 0.05, drawn
    assert any(delay < 0.9 * ceiling for chosen in delays for delay, ceiling in zip(chosen, ceilings)), drawn
    # The ceiling grows past the first backoff (each later draw is uniform on
    # 0..2: that all 12 stay under 1 s has probability 2**-12).
    assert max(delay for chosen in delays for delay in chosen[1:]) > backoff, delays


def test_a_job_that_always_overruns_its_timeout_ends_as_die(tmp_path, redis_server, prefix, client, keys, daemons,
                                                            testlog, process_env):
    """Queue T1 has a 1 s timeout; the job sleeps 30 s. With --retries=0 a run
    that did not complete still runs again EXPIRY_RETRIES (2) times: 3 runs,
    each killed, EXP between them, then DIE."""
    workdir = write_config(tmp_path / "t1", prefix, redis_server.url, worker="testworker:Recorder('T1')")
    configure(workdir, trail_length=50)
    jobid = "sleep30-overrun:T1"
    worker = daemons.start("work", cwd=workdir)
    daemons.start("dispatch", cwd=workdir)
    cli_ok(workdir, process_env, "set", jobid, "NOW", "--retries=0")
    wait_for(lambda: status_of(client, keys, jobid) == "DIE", timeout=60, what="the job to end as DIE")

    done = ordered_runs(client, testlog, jobid)
    assert len(done) == 3, done
    assert all(run["end"] is None for run in done), "a run was not killed"
    finished = run_events(client, keys, jobid)
    assert [event.fields["token"] for event in finished] == [run["token"] for run in done]
    assert [event.fields["attempt"] for event in finished] == ["1", "2", "3"]
    assert [event.fields["status"] for event in finished] == ["EXP", "EXP", "DIE"]
    for run, event in zip(done, finished):  # killed for its timeout, not later
        assert 0.9 <= event.at - run["start"] <= 1 + SLACK + 1, (run, event)
    # Nothing left to run it again.
    assert client.zscore(keys.timeline, jobid) is None
    assert client.llen(keys.queue("T1")) == 0
    assert client.hget(keys.leases, jobid) is None
    told = tell(workdir, process_env, jobid)
    assert told["last_error"]["status"] == "DIE" and "timed out after 1s" in told["last_error"]["error"], told
    log = daemons.log(worker)
    assert len(re.findall(rf"job {re.escape(jobid)}: killed: timed out after 1s", log)) == 3, log


# ------------------------------------------------------------------ occurrences


def test_tell_of_a_past_due_queued_job_shows_its_occurrence(workdir, client, keys, daemons, process_env):
    """No worker: the dispatcher fires an occurrence late (it was not running
    when the occurrence fell due); tell shows that occurrence as ``due``, not
    the time the job was enqueued, and the occurrence after it as next_run."""
    jobid = "every10:A"
    schedule = "FREQ=SECONDLY;INTERVAL=10"
    cli_ok(workdir, process_env, "set", jobid, schedule)
    occurrence = tell(workdir, process_env, jobid)["next_run"]
    assert occurrence is not None
    wait_for(lambda: time.time() > occurrence + 2, timeout=20, what="the occurrence to be 2 s past")
    daemons.start("dispatch", cwd=workdir)
    wait_for(lambda: status_of(client, keys, jobid) == "ENQ", timeout=20, what="the dispatcher to fire it")

    told = tell(workdir, process_env, jobid)
    assert told["event"] == "ENQ" and told["queue"] == "A" and told["queue_length"] == 1, told
    assert told["since"] >= int(occurrence) + 2, told  # enqueued late ...
    assert told["due"] == pytest.approx(occurrence, abs=1e-3), told  # ... for the occurrence that fell due
    following = parse_schedule(schedule).first_after(occurrence)
    assert following is not None and following > told["since"]
    assert told["next_run"] == pytest.approx(following, abs=1e-3), told


# -------------------------------------------------------------------- retry


def wait_runs(client: redis.Redis, keys: Keys, testlog: str, jobid: str, count: int, status: str) -> None:
    wait_for(lambda: len(run_events(client, keys, jobid)) == count and status_of(client, keys, jobid) == status
             and len(starts(client, testlog, jobid)) == count,
             timeout=30, what=f"{jobid} to have run {count} time(s) and be {status}")


def test_retry_puts_failed_jobs_back_at_once_with_a_fresh_attempt_count(workdir, client, keys, daemons, testlog,
                                                                         process_env):
    configure(workdir, trail_length=50)
    daemons.start("work", cwd=workdir)
    daemons.start("dispatch", cwd=workdir)
    once, twice, yearly, fine = "fail-once:A", "fail-twice:A", "fail-yearly:A", "fine:A"
    cli_ok(workdir, process_env, "set", once, "NOW")
    cli_ok(workdir, process_env, "set", twice, "NOW", "--retries=1")
    # A recurring job whose last occurrence (1 January) failed: put back, it
    # runs at once for that occurrence, not next year.
    cli_ok(workdir, process_env, "set", yearly, "0 0 1 1 *", f"--after={time.time() - 370 * 86400:.0f}")
    cli_ok(workdir, process_env, "set", fine, "NOW")
    wait_runs(client, keys, testlog, once, 1, "DIE")
    wait_runs(client, keys, testlog, twice, 2, "DIE")
    wait_runs(client, keys, testlog, yearly, 1, "DIE")
    wait_runs(client, keys, testlog, fine, 1, "END")
    yearly_due = run_events(client, keys, yearly)[0].fields["due"]
    assert float(yearly_due) < time.time() - 3600

    asked = time.time()
    result = cli(workdir, process_env, "retry", twice)
    assert result.returncode == 0 and "1 job(s) put back" in result.stderr, result
    wait_runs(client, keys, testlog, twice, 4, "DIE")
    assert [e.fields["attempt"] for e in run_events(client, keys, twice)] == ["1", "2", "1", "2"]
    assert [e.fields["status"] for e in run_events(client, keys, twice)] == ["RTY", "DIE", "RTY", "DIE"]
    assert ordered_runs(client, testlog, twice)[2]["start"] - asked < 10

    asked = time.time()
    result = cli(workdir, process_env, "retry", "--status=DIE")
    assert result.returncode == 0 and "3 job(s) put back" in result.stderr, result
    wait_runs(client, keys, testlog, once, 2, "DIE")
    wait_runs(client, keys, testlog, twice, 6, "DIE")
    wait_runs(client, keys, testlog, yearly, 2, "DIE")
    assert [e.fields["attempt"] for e in run_events(client, keys, once)] == ["1", "1"]
    assert [e.fields["attempt"] for e in run_events(client, keys, twice)][4:] == ["1", "2"]
    yearly_runs = run_events(client, keys, yearly)
    assert [e.fields["attempt"] for e in yearly_runs] == ["1", "1"]
    assert yearly_runs[1].fields["due"] == yearly_due  # the occurrence that failed
    for jobid in (once, yearly):
        assert ordered_runs(client, testlog, jobid)[-1]["start"] - asked < 10

    # A job that did not fail is left as it is, with a message.
    result = cli(workdir, process_env, "retry", fine)
    assert result.returncode == 0, result
    assert f"{fine} has not failed; left as it is" in result.stderr and "0 job(s) put back" in result.stderr, result
    assert status_of(client, keys, fine) == "END"
    assert client.zscore(keys.timeline, fine) is None and fine not in client.lrange(keys.queue("A"), 0, -1)
    assert len(starts(client, testlog, fine)) == 1
    assert [e.event for e in trail(client, keys, fine)].count("retry") == 0

    # An unknown job: exit 3, no traceback; bad --status: one line, non-zero.
    result = cli(workdir, process_env, "retry", "nosuch:A")
    assert result.returncode == 3, result
    assert result.stderr == "redbike: no such job: nosuch:A\n", result
    assert "Traceback" not in result.stderr + result.stdout
    result = cli(workdir, process_env, "retry", "--status=END")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("redbike:"), result
