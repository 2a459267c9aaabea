"""Real-process tests: `redbike dispatch`, `redbike work` and the CLI run as
subprocesses against a real redis-server, driven and stopped the way an
operator would (CLI, HALT, signals, kill -9).

Every job the daemons run is tests/testworker.py's Recorder: each run appends
a start and an end record (job, pid, token, at) to the list TESTLOG_KEY on the
session's Redis server, and the assertions are made on those records and on
what redbike keeps in Redis.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import (
    SCRIPT_COMMANDS,
    RedisServer,
    alive,
    free_port,
    parent_of,
    redbike_command,
    wait_for,
    worker_of,
    write_config,
)

from redbike import Redbike, RoundRobin
from redbike.keys import Keys

EXIT_TIMEOUT = 10  # seconds a daemon may take to exit after HALT or SIGTERM


# --------------------------------------------------------------------- helpers


@pytest.fixture
def env(process_env: dict[str, str]) -> dict[str, str]:
    return process_env


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
def bike(client: redis.Redis, prefix: str) -> Redbike:
    """The Python API on the test server, routing jobs as Recorder does."""
    return Redbike(RoundRobin(), prefix=prefix, client=client)


def cli(
    cwd: Path, env: dict[str, str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess:
    return subprocess.run(
        redbike_command(*args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_ok(cwd: Path, env: dict[str, str], *args: str) -> str:
    result = cli(cwd, env, *args)
    assert result.returncode == 0, f"redbike {' '.join(args)}: {result.stderr}"
    return result.stdout


def halt(cwd: Path, env: dict[str, str], *processes: subprocess.Popen) -> None:
    """`redbike control HALT`; every process must then exit 0, promptly."""
    cli_ok(cwd, env, "control", "HALT")
    for process in processes:
        assert process.wait(EXIT_TIMEOUT) == 0, f"{process.args} exited {process.returncode}"


def records(client: redis.Redis, testlog: str) -> list[dict[str, Any]]:
    return [json.loads(item) for item in client.lrange(testlog, 0, -1)]


def starts(client: redis.Redis, testlog: str, job: str | None = None) -> list[dict[str, Any]]:
    return [
        r for r in records(client, testlog) if r["event"] == "start" and job in (None, r["job"])
    ]


def ends(client: redis.Redis, testlog: str, job: str | None = None) -> list[dict[str, Any]]:
    return [r for r in records(client, testlog) if r["event"] == "end" and job in (None, r["job"])]


def runs(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Runs by token: job, pid, start and (if it ended) end."""
    found: dict[str, dict[str, Any]] = {}
    for r in recs:
        run = found.setdefault(r["token"], {"job": r["job"], "pid": r["pid"], "end": None})
        run[r["event"]] = r["at"]
    return found


def status_of(client: redis.Redis, keys: Keys, jobid: str) -> str:
    return (client.hget(keys.statuses, jobid) or "").split(":")[0]


def leads(client: redis.Redis, keys: Keys) -> str | None:
    return client.get(keys.dispatcher)


def subscribed(client: redis.Redis, channel: str) -> bool:
    return client.pubsub_numsub(channel)[0][1] >= 1


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("redbike:"), result.stderr
    return lines[0]


# ----------------------------------------------------------------------- tests


def test_end_to_end(workdir, client, keys, daemons, testlog, env):
    dispatcher = daemons.start("dispatch", cwd=workdir)
    worker = daemons.start("work", cwd=workdir)
    wait_for(lambda: leads(client, keys), what="the dispatcher to lead")

    at = time.time() + 1.5
    cli_ok(workdir, env, "set", "at-1:A", f"AT:{at:.3f}")
    cli_ok(workdir, env, "set", "now-1:A", "NOW")
    cli_ok(workdir, env, "set", "backoff-1:B", "CONTINUE")
    cli_ok(workdir, env, "set", "rrule-1:A", "FREQ=SECONDLY;INTERVAL=1")
    cli_ok(workdir, env, "set", "fail-1:B", "NOW")

    def all_ran() -> bool:
        recs = records(client, testlog)
        ended = {r["job"] for r in recs if r["event"] == "end"}
        count = Counter(r["job"] for r in recs if r["event"] == "start")
        return (
            {"at-1:A", "now-1:A", "fail-1:B"} <= ended
            and count["backoff-1:B"] >= 3
            and count["rrule-1:A"] >= 3
        )

    wait_for(all_ran, timeout=15, what="every job to run")
    recs = records(client, testlog)
    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in sorted(runs(recs).values(), key=lambda run: run["start"]):
        by_job[run["job"]].append(run)

    assert len(by_job["now-1:A"]) == 1
    assert len(by_job["fail-1:B"]) == 1  # a failure is not retried
    assert len(by_job["at-1:A"]) == 1
    assert by_job["at-1:A"][0]["start"] >= at - 0.01, "an AT job ran before its time"
    # CONTINUE with backoff 1: each run starts at least a second after the last ended.
    backoff = [run for run in by_job["backoff-1:B"] if run["end"] is not None]
    assert all(b["start"] - a["end"] >= 0.9 for a, b in pairwise(backoff)), backoff
    # Secondly: never two runs in one second.
    seconds = [int(run["start"]) for run in by_job["rrule-1:A"]]
    assert seconds == sorted(set(seconds)), seconds

    statuses = {row[0]: row for row in csv.reader(io.StringIO(cli_ok(workdir, env, "statuses")))}
    assert statuses["now-1:A"][1] == "END" and statuses["at-1:A"][1] == "END"
    assert statuses["fail-1:B"][1] == "DIE"
    assert statuses["backoff-1:B"][1] in ("TML", "ENQ", "WRK")
    assert statuses["rrule-1:A"][1] in ("TML", "ENQ", "WRK")
    assert all(abs(int(row[2]) - time.time()) < 60 for row in statuses.values())

    told = json.loads(cli_ok(workdir, env, "tell", "fail-1:B"))
    assert told["last_error"]["status"] == "DIE"
    assert "ValueError: fail-1:B failed on purpose" in told["last_error"]["error"]
    assert "last_error" not in json.loads(cli_ok(workdir, env, "tell", "now-1:A"))

    halt(workdir, env, dispatcher, worker)


def test_sigterm_lets_the_running_job_finish(workdir, client, keys, bike, daemons, testlog):
    worker = daemons.start("work", cwd=workdir)
    bike.set("sleep1-term:A", "NOW")
    bike.set("queued-term:A", "NOW")  # waits behind it: one slot
    started = wait_for(lambda: starts(client, testlog, "sleep1-term:A"), what="the job to start")[0]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(EXIT_TIMEOUT) == 0
    ended = ends(client, testlog, "sleep1-term:A")
    assert len(ended) == 1 and ended[0]["at"] - started["at"] >= 1, "the run was cut short"
    assert status_of(client, keys, "sleep1-term:A") == "END"
    assert not alive(started["pid"])
    # Stopping, it claimed nothing more.
    assert starts(client, testlog, "queued-term:A") == []
    assert status_of(client, keys, "queued-term:A") == "ENQ"


def test_a_second_sigterm_kills_the_running_job(workdir, client, keys, bike, daemons, testlog):
    worker = daemons.start("work", cwd=workdir)
    bike.set("hang-term:A", "NOW")
    started = wait_for(lambda: starts(client, testlog, "hang-term:A"), what="the job to start")[0]
    worker.send_signal(signal.SIGTERM)
    # Two signals sent at once are one signal: send the second once the first was seen.
    wait_for(lambda: "stopping after the running jobs" in daemons.log(worker), what="the first SIGTERM")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(EXIT_TIMEOUT) == 0
    assert not alive(started["pid"]) and ends(client, testlog, "hang-term:A") == []
    assert status_of(client, keys, "hang-term:A") == "EXP"
    error = json.loads(client.hget(keys.errors, "hang-term:A"))
    assert error["error"] == "killed: stopped by force" and error["status"] == "EXP"
    assert client.hlen(keys.leases) == 0


def test_sigkill_worker_mid_job_is_reaped_and_rerun(
    workdir, client, keys, bike, daemons, testlog, env
):
    dispatcher = daemons.start("dispatch", cwd=workdir)
    worker = daemons.start("work", "testworker:Recorder('T')", cwd=workdir)
    bike.set("hang-kill:T", "NOW")
    first = wait_for(lambda: starts(client, testlog, "hang-kill:T"), what="the job to start")[0]
    assert alive(first["pid"])
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait(5) == -signal.SIGKILL
    wait_for(
        lambda: not alive(first["pid"]),
        timeout=5,
        what="the job's child to die with its supervisor",
    )

    def reaped() -> dict[str, Any] | None:
        told = bike.tell("hang-kill:T")
        return told if told and "last_error" in told else None

    told = wait_for(reaped, timeout=15, what="the dispatcher to reap the lease")
    assert told["last_error"]["status"] == "EXP"
    assert "lease expired" in told["last_error"]["error"]
    assert "lease" not in told
    # A NOW job whose run did not finish runs again: back in its queue.
    wait_for(
        lambda: status_of(client, keys, "hang-kill:T") == "ENQ",
        timeout=5,
        what="the job to be queued again",
    )

    second_worker = daemons.start("work", "testworker:Recorder('T')", cwd=workdir)
    again = wait_for(
        lambda: [r for r in starts(client, testlog, "hang-kill:T") if r["token"] != first["token"]],
        what="a second run",
    )
    assert len(again) == 1 and again[0]["pid"] != first["pid"]
    assert ends(client, testlog, "hang-kill:T") == []
    assert bike.unset("hang-kill:T") == 2  # running: removed when it ends (at its 2 s timeout)
    halt(workdir, env, dispatcher, second_worker)


def test_two_dispatchers_each_job_once_and_standby_takes_over(
    workdir, client, keys, bike, daemons, testlog, env
):
    first = daemons.start("dispatch", cwd=workdir)
    second = daemons.start("dispatch", cwd=workdir)
    worker = daemons.start("work", "--concurrency", "4", cwd=workdir)
    wait_for(lambda: leads(client, keys), what="a dispatcher to lead")

    jobs = [f"many-{n}:{'AB'[n % 2]}" for n in range(200)]
    for n, jobid in enumerate(jobs):
        schedule = "NOW" if n % 4 == 0 else f"AT:{time.time() + 0.05 + 2.0 * n / len(jobs):.3f}"
        assert bike.set(jobid, schedule) == "PLACED"

    def all_ended() -> bool:
        values = client.hmget(keys.statuses, jobs)
        return all(value and value.startswith("END:") for value in values)

    wait_for(all_ended, timeout=40, what="all 200 jobs to end")  # slack for a loaded machine
    count = Counter(r["job"] for r in starts(client, testlog))
    assert {job: count[job] for job in jobs} == {job: 1 for job in jobs}
    assert client.zcard(keys.timeline) == 0
    assert client.llen(keys.queue("A")) == client.llen(keys.queue("B")) == 0
    assert first.poll() is None and second.poll() is None

    token = leads(client, keys)
    leader_pid = int(token.split(":")[-2])  # epoch:host:pid:nonce
    by_pid = {first.pid: first, second.pid: second}
    assert leader_pid in by_pid, token
    leader = by_pid.pop(leader_pid)
    (standby,) = by_pid.values()
    leader.kill()
    assert leader.wait(5) == -signal.SIGKILL
    killed = time.monotonic()

    at = time.time() + 3
    bike.set("late:A", f"AT:{at:.3f}")
    wait_for(
        lambda: (leads(client, keys) or "").split(":")[-2:-1] == [str(standby.pid)],
        timeout=10,
        what="the standby to take the lease",
    )
    assert time.monotonic() - killed < 8
    wait_for(
        lambda: status_of(client, keys, "late:A") == "END", timeout=15, what="the late job to run"
    )
    late = starts(client, testlog, "late:A")
    assert len(late) == 1 and late[0]["at"] >= at - 0.01
    halt(workdir, env, standby, worker)


def test_pool_under_load_never_overlaps_a_job_and_restarts_a_killed_child(
    workdir, client, keys, bike, daemons, testlog, env
):
    dispatcher = daemons.start("dispatch", cwd=workdir)
    worker = daemons.start("work", "--concurrency", "4", cwd=workdir)
    jobs = [f"sleep0.01-{n}:A" for n in range(50)]
    for jobid in jobs:
        bike.set(jobid, "CONTINUE")
    # Load: the 50 jobs run again and again until 4 slots have run 200 of them.
    wait_for(lambda: client.llen(testlog) > 2 * 200, timeout=60, what="200 runs under load")

    def check_no_overlaps(found: dict[str, dict[str, Any]]) -> None:
        by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for run in found.values():
            if run["end"] is not None and "start" in run:
                by_job[run["job"]].append(run)
        for job, job_runs in by_job.items():
            job_runs.sort(key=lambda run: run["start"])
            for a, b in pairwise(job_runs):
                assert b["start"] >= a["end"], f"{job}: two runs overlap: {a} {b}"

    recs = records(client, testlog)
    found = runs(recs)
    check_no_overlaps(found)
    pids = {run["pid"] for run in found.values()}
    assert len(pids) == 4, pids
    assert {run["job"] for run in found.values()} == set(jobs)
    assert len(found) > 200  # it did keep 4 slots busy

    victim = min(pids)
    # The children are forked by the pool's zygote, itself the worker's child.
    assert alive(victim) and worker_of(victim) == worker.pid
    mark = len(recs)
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        later = records(client, testlog)[mark:]
        new = {r["pid"] for r in later} - pids
        return (
            len(new) == 1 and sum(1 for r in later if r["pid"] in new and r["event"] == "end") >= 10
        )

    wait_for(replaced, timeout=10, what="a new child to run jobs")
    wait_for(
        lambda: len(starts(client, testlog)) > len(recs) + 200,
        timeout=10,
        what="the pool to keep going",
    )
    found = runs(records(client, testlog))
    check_no_overlaps(found)
    assert not alive(victim)
    # The run the kill cut short (if one was running) ended EXP.
    cut = [run for run in found.values() if run["pid"] == victim and run["end"] is None]
    assert len(cut) <= 1
    for run in cut:
        error = bike.tell(run["job"])["last_error"]
        assert error["status"] == "EXP" and error["error"] == "worker process died (killed by signal 9: SIGKILL)"
    assert worker.poll() is None
    halt(workdir, env, dispatcher, worker)


def test_timeout_kills_the_job_and_runs_it_again(
    workdir, client, keys, bike, daemons, testlog, env
):
    dispatcher = daemons.start("dispatch", cwd=workdir)
    worker = daemons.start("work", "testworker:Recorder('T')", cwd=workdir)
    bike.set("sleep5-slow:T", "NOW")
    first = wait_for(lambda: starts(client, testlog, "sleep5-slow:T"), what="the job to start")[0]

    def timed_out() -> dict[str, Any] | None:
        told = bike.tell("sleep5-slow:T") or {}
        return told.get("last_error")

    error = wait_for(timed_out, timeout=8, what="the job to be killed at its timeout")
    assert error["status"] == "EXP"
    assert error["error"].startswith("killed: timed out"), error
    assert 1.9 <= error["at"] - first["at"] < 4, "killed too early or too late"
    wait_for(lambda: not alive(first["pid"]), timeout=5, what="the job's child to be killed")
    again = wait_for(
        lambda: [
            r for r in starts(client, testlog, "sleep5-slow:T") if r["token"] != first["token"]
        ],
        timeout=10,
        what="the job to run again",
    )
    assert again[0]["pid"] != first["pid"]
    assert ends(client, testlog, "sleep5-slow:T") == [], "the killed run must not have ended"
    assert bike.unset("sleep5-slow:T") == 2
    halt(workdir, env, dispatcher, worker)


def test_daemons_survive_a_redis_restart(tmp_path, client, prefix, keys, daemons, testlog, env):
    folder = tmp_path / "own-redis"
    folder.mkdir()
    server = RedisServer(folder)  # a port of its own, kept across the restart
    server.start()
    try:
        home = tmp_path / "own"
        write_config(home, prefix, server.url)
        own = server.client()
        dispatcher = daemons.start("dispatch", cwd=home)
        worker = daemons.start("work", cwd=home)
        wait_for(lambda: leads(own, keys), what="the dispatcher to lead")
        wait_for(lambda: subscribed(own, keys.queue_channel("A")), what="the worker to listen")

        server.stop()
        wait_for(
            lambda: "Redis error" in daemons.log(dispatcher),
            timeout=10,
            what="the dispatcher to notice the outage",
        )
        wait_for(
            lambda: "lost" in daemons.log(worker),
            timeout=10,
            what="the worker to notice the outage",
        )
        server.start()
        own = server.client()
        assert own.dbsize() == 0  # a new, empty server
        wait_for(lambda: leads(own, keys), timeout=15, what="the dispatcher to lead again")
        wait_for(
            lambda: subscribed(own, keys.queue_channel("A")),
            timeout=15,
            what="the worker to listen again",
        )

        own_bike = Redbike(RoundRobin(), prefix=prefix, client=own)
        own_bike.set("after-restart:A", "NOW")
        own_bike.set("at-restart:B", f"AT:{time.time() + 1:.3f}")  # needs the dispatcher
        wait_for(
            lambda: (
                ends(client, testlog, "after-restart:A") and ends(client, testlog, "at-restart:B")
            ),
            timeout=15,
            what="jobs set after the restart to run",
        )
        assert dispatcher.poll() is None and worker.poll() is None
        halt(home, env, dispatcher, worker)
    finally:
        server.stop()


def test_cli_bad_input(workdir, tmp_path, client, keys, bike, daemons, env):
    # Unknown command.
    assert "bad command line" in one_line_error(cli(workdir, env, "frobnicate"))

    # A bad RRULE: a new job is recorded BAD, an existing job keeps its schedule.
    result = cli(workdir, env, "set", "new-bad:A", "FREQ=SOMETIMES")
    assert result.returncode == 2
    one_line_error(result)
    statuses = {row[0]: row[1] for row in csv.reader(io.StringIO(cli_ok(workdir, env, "statuses")))}
    assert statuses["new-bad:A"] == "BAD"
    cli_ok(workdir, env, "set", "old-good:A", "FREQ=DAILY")
    result = cli(workdir, env, "set", "old-good:A", "FREQ=DAILY;BYHOUR=99")
    assert result.returncode == 2
    one_line_error(result)
    schedules = dict(csv.reader(io.StringIO(cli_ok(workdir, env, "schedules"))))
    assert schedules["old-good:A"] == "FREQ=DAILY"
    assert status_of(client, keys, "old-good:A") == "TML"

    # A bad --after: nothing is set.
    result = cli(workdir, env, "set", "after-bad:A", "FREQ=HOURLY", "--after=yesterday-ish")
    assert result.returncode == 2
    assert "yesterday-ish" in one_line_error(result)
    assert not client.hexists(keys.schedules, "after-bad:A")

    # A malformed schedules CSV: dispatch stops before setting anything.
    table = tmp_path / "jobs.csv"
    table.write_text("csv-good:A,NOW\ncsv-broken:A\n")
    result = cli(workdir, env, "dispatch", f"--schedules={table}", timeout=20)
    assert result.returncode == 2
    assert "csv-broken" in one_line_error(result)
    assert not client.hexists(keys.schedules, "csv-good:A")
    assert leads(client, keys) is None, "it must not have started dispatching"

    # A worker spec that does not import.
    result = cli(workdir, env, "work", "no_such_module_here:Worker('A')", timeout=20)
    assert result.returncode == 2
    assert "no_such_module_here" in one_line_error(result)

    # A missing explicit config file.
    result = cli(workdir, env, "--config", str(tmp_path / "missing.conf"), "statuses")
    assert result.returncode == 2
    assert "missing.conf" in one_line_error(result)

    # Redis unreachable: a runtime failure (exit 1), for a command and a daemon.
    closed = tmp_path / "closed"
    write_config(closed, "x", f"redis://127.0.0.1:{free_port()}/0")
    for args in (["statuses"], ["dispatch"]):
        result = cli(closed, env, *args, timeout=20)
        assert "cannot reach Redis" in one_line_error(result)
        assert result.returncode == 1

    # tell of an unknown job.
    result = cli(workdir, env, "tell", "nobody:A")
    assert result.returncode == 3
    assert "nobody:A" in one_line_error(result)
    result = cli(workdir, env, "unset", "nobody:A")
    assert result.returncode == 3
    one_line_error(result)

    # A pool of no processes.
    for bad in ("0", "-1", "many"):
        result = cli(workdir, env, "work", f"--concurrency={bad}", timeout=20)
        assert result.returncode == 2
        one_line_error(result)


def test_cli_version_help_csv_and_dispatch_schedules(workdir, tmp_path, client, keys, daemons, env):
    result = subprocess.run(
        [sys.executable, "-m", "redbike", "--version"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("redbike "), result
    script = Path(sys.executable).with_name("redbike")
    result = subprocess.run(
        [str(script), "--help"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0 and "Usage:" in result.stdout and "redbike" in result.stdout, (
        result
    )

    after = time.time() - 90 * 60
    later = time.time() + 3600
    table = tmp_path / "jobs.csv"
    with open(table, "w", newline="") as handle:
        rows = [
            ("csv-hourly:A", "FREQ=HOURLY"),  # fell due 30 minutes ago
            ("csv-later:B", f"AT:{later:.0f}"),
            ("csv-weekly:A", "FREQ=WEEKLY;BYDAY=MO,TU"),  # a comma: quoted in CSV
        ]
        csv.writer(handle).writerows(rows)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(after))
    dispatcher = daemons.start("dispatch", f"--schedules={table}", f"--after={stamp}", cwd=workdir)
    wait_for(lambda: leads(client, keys), what="the dispatcher to lead")
    timefile = workdir / "timefile"
    wait_for(
        lambda: timefile.exists() and float(timefile.read_text()) > time.time() - 5,
        what="the dispatcher to go round once",
    )

    schedules = dict(csv.reader(io.StringIO(cli_ok(workdir, env, "schedules"))))
    assert schedules == dict(rows)
    statuses = {row[0]: row for row in csv.reader(io.StringIO(cli_ok(workdir, env, "statuses")))}
    assert set(statuses) == {jobid for jobid, _ in rows}
    assert all(len(row) == 3 and int(row[2]) > 0 for row in statuses.values())
    assert statuses["csv-hourly:A"][1] == "ENQ"
    assert client.lrange(keys.queue("A"), 0, -1) == ["csv-hourly:A"]  # enqueued once, no more
    assert statuses["csv-later:B"][1] == "TML"
    assert json.loads(cli_ok(workdir, env, "tell", "csv-later:B"))["next_run"] == float(
        f"{later:.0f}"
    )
    assert statuses["csv-weekly:A"][1] == "TML"
    assert client.zscore(keys.timeline, "csv-weekly:A") > time.time()
    halt(workdir, env, dispatcher)

    # Output into a pipe whose reader is gone (`redbike schedules | head -1`): no traceback.
    buffered = {name: value for name, value in env.items() if name != "PYTHONUNBUFFERED"}
    for args in (["--help"], ["--version"], ["schedules"], ["statuses"]):
        process = subprocess.Popen(
            redbike_command(*args),
            cwd=workdir,
            env=buffered,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        process.stdout.close()
        errors = process.stderr.read().decode()
        process.stderr.close()
        assert process.wait(30) == 0 and errors == "", (args, errors)


def test_timefile_makes_a_missed_run_fire_once(workdir, client, keys, daemons, testlog, env):
    timefile = workdir / "timefile"
    dispatcher = daemons.start("dispatch", cwd=workdir)
    wait_for(lambda: timefile.exists(), what="the timefile")
    halt(workdir, env, dispatcher)
    assert abs(float(timefile.read_text()) - time.time()) < 10

    # No dispatcher ran for two hours: an hourly job fell due meanwhile.
    timefile.write_text(f"{time.time() - 7200:.6f}\n")
    cli_ok(workdir, env, "set", "gap-hourly:A", "FREQ=HOURLY")
    assert status_of(client, keys, "gap-hourly:A") == "ENQ"
    assert client.lrange(keys.queue("A"), 0, -1) == ["gap-hourly:A"]  # once, not twice
    assert client.zscore(keys.timeline, "gap-hourly:A") is None
    # A job set while the timefile is current waits for its first hour.
    timefile.write_text(f"{time.time():.6f}\n")
    cli_ok(workdir, env, "set", "fresh-hourly:A", "FREQ=HOURLY")
    assert status_of(client, keys, "fresh-hourly:A") == "TML"
    assert client.zscore(keys.timeline, "fresh-hourly:A") > time.time() + 3500

    worker = daemons.start("work", cwd=workdir)
    wait_for(lambda: status_of(client, keys, "gap-hourly:A") == "TML", what="the missed run to run")
    assert len(starts(client, testlog, "gap-hourly:A")) == 1
    assert client.zscore(keys.timeline, "gap-hourly:A") > time.time() + 3500  # next: an hour on
    assert starts(client, testlog, "fresh-hourly:A") == []
    halt(workdir, env, worker)


def test_idle_daemons_cost_little_and_wake_at_once(
    workdir, redis_server, client, keys, bike, daemons, testlog, env
):
    worker = daemons.start("work", cwd=workdir)
    dispatcher = daemons.start("dispatch", cwd=workdir)
    wait_for(lambda: leads(client, keys), what="the dispatcher to lead")
    wait_for(lambda: subscribed(client, keys.queue_channel("B")), what="the worker to listen")
    wait_for(lambda: workdir.joinpath("timefile").exists(), what="the dispatcher to go round once")
    # Both have written their registry entries (the writes of a start are not the idle cost).
    wait_for(lambda: len(list(client.scan_iter(match=keys.process_pattern()))) >= 2,
             what="both processes to register")

    # Watch every command (MONITOR marks the ones scripts run as 'lua'), between
    # two markers sent in the same transactions as the INFO snapshots.
    watcher = redis.Redis(port=redis_server.port, decode_responses=True)
    seen: list[dict[str, Any]] = []
    inside = threading.Event()
    with watcher.monitor() as monitor:

        def watch() -> None:
            for command in monitor.listen():
                if command["command"] == "ECHO window-start":
                    inside.set()
                elif command["command"] == "ECHO window-end":
                    return
                elif inside.is_set():
                    seen.append(command)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()

        def snapshot(marker: str) -> dict[str, int]:
            with client.pipeline(transaction=True) as pipe:
                pipe.echo(marker)
                pipe.info("commandstats")
                stats = pipe.execute()[1]
            return {name: int(value["calls"]) for name, value in stats.items()}

        before = snapshot("window-start")
        window_start = time.monotonic()
        time.sleep(4)  # the measuring window itself
        after = snapshot("window-end")
        window = time.monotonic() - window_start
        thread.join(10)
        assert not thread.is_alive()

    ours = {"cmdstat_echo", "cmdstat_info", "cmdstat_multi", "cmdstat_exec"}
    calls = {name: after.get(name, 0) - before.get(name, 0) for name in after if name not in ours}
    total = sum(calls.values())
    scripts = sum(calls.get(f"cmdstat_{name}", 0) for name in ("eval", *SCRIPT_COMMANDS))
    in_scripts = sum(1 for command in seen if command["client_type"] == "lua")
    top_level = total - in_scripts
    assert scripts / window <= 2, calls
    assert top_level / window < 3, (calls, in_scripts)
    assert top_level >= scripts >= 1, "the dispatcher must renew its lease"

    # An idle worker is woken at once (well before its 6 s look at the queues).
    bike.set("idle-now:A", "NOW")
    wait_for(lambda: starts(client, testlog, "idle-now:A"), timeout=4, what="the NOW job to start")
    halt(workdir, env, worker, dispatcher)


def test_a_child_killed_while_idle_is_replaced(workdir, client, keys, bike, daemons, testlog, env):
    worker = daemons.start("work", cwd=workdir)
    bike.set("first-idle:A", "NOW")
    first = wait_for(lambda: ends(client, testlog, "first-idle:A"), what="the first job to end")[0]
    wait_for(
        lambda: status_of(client, keys, "first-idle:A") == "END", what="the first run to be ended"
    )
    zygote = parent_of(first["pid"])  # forks the children; the worker's own child
    assert alive(first["pid"]) and parent_of(zygote) == worker.pid
    os.kill(first["pid"], signal.SIGKILL)  # the slot's child dies between jobs
    wait_for(lambda: not alive(first["pid"]), timeout=5, what="the child to die")

    bike.set("second-idle:A", "NOW")
    second = wait_for(
        lambda: ends(client, testlog, "second-idle:A"), timeout=8, what="the next job to run"
    )
    assert len(second) == 1 and second[0]["pid"] != first["pid"]
    assert status_of(client, keys, "second-idle:A") == "END"

    # The zygote itself killed: its child dies with it, and a new zygote forks a new one.
    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: not alive(zygote) and not alive(second[0]["pid"]), timeout=5, what="the zygote and its child to die")
    bike.set("third-idle:A", "NOW")
    third = wait_for(lambda: ends(client, testlog, "third-idle:A"), timeout=8, what="a job after the zygote died")
    assert worker_of(third[0]["pid"]) == worker.pid and parent_of(third[0]["pid"]) != zygote
    assert worker.poll() is None
    halt(workdir, env, worker)
