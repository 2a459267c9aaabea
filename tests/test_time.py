"""Time: one-offs set late, the timefile (ahead of the clock, absurd, unwritable),
needs kept across `set`, and Redis' clock shared by every process."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
import test_processes
from conftest import RedisServer, free_port, wait_for
from test_processes import cli, cli_ok, halt, leads, one_line_error, starts, status_of

from redbike import Redbike, RoundRobin
from redbike.clock import RedisClock
from redbike.dispatcher import Dispatcher
from redbike.keys import Keys
from redbike.records import decode_job
from redbike.timefile import write_timefile

# The real-process fixtures of test_processes.
env, keys = test_processes.env, test_processes.keys  # daemons and testlog come from conftest


def statuses(client: redis.Redis, keys: Keys) -> dict[str, str]:
    return client.hgetall(keys.statuses)


# ------------------------------------------------------------ bug 1: one-offs set late


def test_one_offs_at_and_before_the_timefile_run_once(workdir, client, keys, daemons, testlog, env):
    timefile = workdir / "timefile"
    dispatcher = daemons.start("dispatch", cwd=workdir)
    worker = daemons.start("work", "--concurrency=2", cwd=workdir)
    wait_for(lambda: leads(client, keys) and timefile.exists(), what="the dispatcher's timefile")
    written = float(timefile.read_text())
    ats = {"at": written, "before": written - 0.5, "well-before": written - 3600}
    for name, at in ats.items():
        cli_ok(workdir, env, "set", f"set-{name}:A", f"AT:{at:.6f}")
    cli_ok(workdir, env, "set", "set-now:A", f"AT:{time.time():.6f}")
    table = workdir / "jobs.csv"
    table.write_text("".join(f"csv-{name}:B,AT:{at:.6f}\n" for name, at in ats.items()))
    loader = daemons.start("dispatch", f"--schedules={table}", cwd=workdir)  # stands by
    jobs = [f"{how}-{name}:{q}" for how, q in (("set", "A"), ("csv", "B")) for name in ats] + ["set-now:A"]

    def all_ended() -> bool:
        return all(status_of(client, keys, job) == "END" for job in jobs)

    wait_for(all_ended, timeout=20, what="every one-off to run")
    # Entered again (the CSV loaded by another dispatcher, `set` again): nothing runs twice.
    before = statuses(client, keys)
    again = daemons.start("dispatch", f"--schedules={table}", cwd=workdir)
    wait_for(lambda: "started" in daemons.log(again), what="the CSV to be loaded again")
    result = cli(workdir, env, "set", "set-well-before:A", f"AT:{ats['well-before']:.6f}")
    assert result.returncode == 0 and "left as it is" in result.stderr
    assert statuses(client, keys) == before
    halt(workdir, env, dispatcher, worker, loader, again)
    assert Counter(run["job"] for run in starts(client, testlog)) == dict.fromkeys(jobs, 1)


# ---------------------------------------------- bug 12: a timefile ahead, absurd times


@pytest.fixture
def clocked(client: redis.Redis, prefix: str, tmp_path: Path) -> Redbike:
    return Redbike(RoundRobin(), prefix=prefix, client=client, timefile=str(tmp_path / "timefile"))


def test_a_timefile_ahead_of_the_clock_swallows_nothing(clocked, client, caplog):
    now = clocked.clock()
    write_timefile(clocked.timefile, now + 3600)  # a fast clock where the dispatcher ran
    with caplog.at_level(logging.WARNING):
        clocked.set("at2:A", f"AT:{now + 30:.3f}")
        clocked.set("count:A", f"DTSTART:{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now + 60))} "
                    "RRULE:FREQ=MINUTELY;COUNT=3")
        clocked.set("hourly:A", "FREQ=HOURLY")
    assert status_of(client, clocked.keys, "at2:A") == "TML"
    assert client.zscore(clocked.keys.timeline, "at2:A") == pytest.approx(now + 30, abs=0.01)
    assert status_of(client, clocked.keys, "count:A") == "TML"
    assert math.floor(now + 60) == client.zscore(clocked.keys.timeline, "count:A")
    assert client.zscore(clocked.keys.timeline, "hourly:A") < now + 3600 + 5  # from now, not the timefile
    warnings = [r.getMessage() for r in caplog.records if "ahead of the clock" in r.getMessage()]
    assert len(warnings) == 3 and "3600s ahead" in warnings[0]


@pytest.mark.parametrize("content", ["nan", "inf", "-inf", "1e300", "99999999999999999999"])
def test_an_absurd_timefile_is_ignored_with_a_warning(clocked, client, caplog, content):
    Path(clocked.timefile).write_text(content + "\n")
    now = clocked.clock()
    with caplog.at_level(logging.WARNING):
        clocked.set("at:A", f"AT:{now + 30:.3f}")
        clocked.set("hourly:A", "FREQ=HOURLY")
    assert status_of(client, clocked.keys, "at:A") == "TML"
    # an hour after the set's own reading of the clock, which comes a little after `now`
    assert now < client.zscore(clocked.keys.timeline, "hourly:A") <= clocked.clock() + 3600
    assert any("ignored" in r.getMessage() and clocked.timefile in r.getMessage() for r in caplog.records)


def test_absurd_times_on_the_command_line_are_one_line_errors(workdir, client, keys, env):
    for args in (["set", "x:A", "FREQ=HOURLY", "--after=99999999999999999999"],
                 ["set", "x:A", "FREQ=HOURLY", "--after=9" + "9" * 400],
                 ["set", "x:A", "AT:9" + "9" * 400],
                 ["statuses", "--before=99999999999999999999"]):
        result = cli(workdir, env, *args)
        assert result.returncode == 2, args
        assert "bad" in one_line_error(result)
    assert not client.hexists(keys.schedules, "x:A") or status_of(client, keys, "x:A") == "BAD"
    (workdir / "timefile").write_text("inf\n")
    result = cli(workdir, env, "set", "y:A", "FREQ=HOURLY")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "ignored" in result.stderr and len(result.stderr.splitlines()) == 1


# ---------------------------------------------------- bug 13: an unwritable timefile


def test_dispatch_refuses_a_timefile_it_cannot_write(workdir, tmp_path, client, keys, env):
    for path in (tmp_path / "missing" / "timefile", tmp_path):
        conf = (workdir / ".redbike.conf").read_text()
        (workdir / "other.conf").write_text(
            "\n".join(f"timefile = {path}" if line.startswith("timefile") else line
                      for line in conf.splitlines()))
        result = cli(workdir, env, "--config=other.conf", "dispatch", timeout=20)
        assert result.returncode == 2
        assert str(path) in one_line_error(result)
        assert leads(client, keys) is None


def test_a_timefile_write_failure_is_survived_and_said_once(client, prefix, tmp_path, caplog):
    folder = tmp_path / "gone"
    folder.mkdir()
    keys = Keys(prefix)
    dispatcher = Dispatcher(client, keys, lambda jobid: "A", timefile=str(folder / "timefile"))
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    now = bike.clock()
    dispatcher.step(now)
    assert (folder / "timefile").exists()
    (folder / "timefile").unlink()
    folder.rmdir()
    with caplog.at_level(logging.INFO, logger="redbike.dispatcher"):
        for i in range(5):
            bike.set(f"due{i}:A", f"AT:{now + i + 0.5:.3f}")
            dispatcher.step(now + i + 1)
        assert client.llen(keys.queue("A")) == 5  # it dispatched on
        folder.mkdir()
        dispatcher.step(now + 7)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot write the timefile" in m]) == 1, messages
    assert any("written again" in m for m in messages)
    assert float((folder / "timefile").read_text()) == pytest.approx(now + 7)


# -------------------------------------------------------- bug 5: stored needs are kept


class Needy(RoundRobin):
    def needs(self, jobid: str) -> str | None:
        return "host:h1,db:d1=2" if jobid.startswith("db") else None


def test_set_without_needs_keeps_the_stored_ones(client, prefix, workdir, daemons, env):
    hooked = Redbike(Needy(), prefix=prefix, client=client)
    plain = Redbike(RoundRobin(), prefix=prefix, client=client)
    keys = hooked.keys
    hooked.set("db1:A", "FREQ=HOURLY")
    assert decode_job(client.hget(keys.jobs, "db1:A")).needs == "db:d1=2,host:h1=1"
    plain.set("db1:A", "FREQ=DAILY")  # no worker, no needs given: kept
    assert decode_job(client.hget(keys.jobs, "db1:A")).needs == "db:d1=2,host:h1=1"
    plain.set_many([("db1:A", "FREQ=HOURLY", "")])  # an empty needs cell: kept
    assert decode_job(client.hget(keys.jobs, "db1:A")).needs == "db:d1=2,host:h1=1"
    plain.set("db1:A", "FREQ=HOURLY", needs="host:h2=1")  # given: replaced
    assert decode_job(client.hget(keys.jobs, "db1:A")).needs == "host:h2=1"
    plain.set("db1:A", "FREQ=HOURLY", needs="none")  # dropped, explicitly
    assert decode_job(client.hget(keys.jobs, "db1:A")).needs == ""
    # The same from the command line, and `dispatch --schedules` run without the worker.
    cli_ok(workdir, env, "set", "db2:A", "NOW", "--needs=host:h3")
    (workdir / "bare.conf").write_text(
        (workdir / ".redbike.conf").read_text().replace("worker = ", "# worker = "))
    cli_ok(workdir, env, "--config=bare.conf", "set", "db2:A", "FREQ=DAILY")
    assert decode_job(client.hget(keys.jobs, "db2:A")).needs == "host:h3=1"
    (workdir / "jobs.csv").write_text("db2:A,FREQ=HOURLY\n")
    loader = daemons.start("--config=bare.conf", "dispatch", "--schedules=jobs.csv", cwd=workdir)
    wait_for(lambda: "started" in daemons.log(loader), what="the CSV to be loaded")
    assert client.hget(keys.schedules, "db2:A") == "FREQ=HOURLY"
    assert decode_job(client.hget(keys.jobs, "db2:A")).needs == "host:h3=1"
    halt(workdir, env, loader)
    cli_ok(workdir, env, "set", "db2:A", "FREQ=DAILY", "--needs=none")
    assert decode_job(client.hget(keys.jobs, "db2:A")).needs == ""


# ----------------------------------------------------------- bug 15: Redis' clock


def test_the_default_clock_is_redis_time(client, prefix):
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    assert isinstance(bike.clock, RedisClock)
    seconds, micros = client.time()
    assert abs(bike.clock() - (seconds + micros / 1e6)) < 0.5
    injected = Redbike(RoundRobin(), prefix=prefix, client=client, clock=lambda: 5.0)
    assert injected.clock() == 5.0
    with client.pipeline(transaction=False) as pipe:  # a Redbike over a pipeline (the bench)
        piped = Redbike(RoundRobin(), prefix=prefix, client=pipe)
        assert abs(piped.clock() - bike.clock()) < 0.5 and len(pipe) == 0


def test_redis_clock_measures_again_and_works_after_fork(client):
    calls = 0
    plain_time = client.time

    def counted() -> tuple[int, int]:
        nonlocal calls
        calls += 1
        return plain_time()

    client.time = counted  # type: ignore[method-assign]
    clock = RedisClock(client, every=3600)
    first = clock()
    assert clock() >= first and calls == 1  # extrapolated, not asked again
    clock._next = 0.0  # a minute later
    clock()
    assert calls == 2
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new connection, the same clock
        try:
            clock._next = 0.0
            seconds, micros = plain_time()
            os.write(write, f"{clock()} {seconds + micros / 1e6}".encode())
        finally:
            os._exit(0)
    os.close(write)
    got, redis_time = (float(x) for x in os.read(read, 100).decode().split())
    os.waitpid(pid, 0)
    assert abs(got - redis_time) < 0.5 and calls >= 2


def test_redis_clock_without_redis_falls_back_and_does_not_raise(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    clock = RedisClock(server.client(), every=0)
    assert abs(clock() - time.time()) < 1
    server.stop()
    assert abs(clock() - time.time()) < 1  # the last reading, extrapolated
    unreachable = RedisClock(redis.Redis(port=free_port(), socket_connect_timeout=0.2))
    assert abs(unreachable() - time.time()) < 1
