"""The real CLI as a subprocess: bad input gets one line on stderr and exit 2,
checked before Redis is contacted, and nothing named by a spec is called."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Daemons, free_port, redbike_command, wait_for

from redbike import Redbike
from redbike.keys import Keys
from redbike.resources import ResourceError, check_name


def run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(redbike_command(*args), check=False, cwd=cwd, capture_output=True, text=True, timeout=60)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("redbike: ")
    return lines[0]


@pytest.fixture
def nowhere(tmp_path: Path) -> Path:
    """A folder whose config names a Redis nobody listens on: a check made
    after connecting would exit 1 (unreachable), not 2."""
    (tmp_path / ".redbike.conf").write_text(
        f"[redbike-redis]\nurl = redis://127.0.0.1:{free_port()}/0\nsocket_connect_timeout = 1\n"
    )
    (tmp_path / "notworker.py").write_text(
        "class Plain:\n    def __init__(self, *args):\n        open('constructed', 'w').close()\n"
    )
    return tmp_path


@pytest.mark.parametrize("word", ["status", "halt", "STOP", "HALT2"])
def test_control_other_than_halt_is_a_usage_error(nowhere, word):
    line = assert_one_line(run(nowhere, "control", word))
    assert line == f"redbike: unknown control command {word!r}; the only one is HALT"


def test_control_halt_still_halts(workdir, client, prefix):
    result = run(workdir, "control", "HALT")
    assert result.returncode == 0, result.stderr
    assert client.get(f"{prefix}:control").startswith("HALT:")


@pytest.mark.parametrize("value", ["abc", "0", "-3", "257", "99999999999999999999", "1.5"])
def test_bad_concurrency_is_refused_before_connecting(nowhere, value):
    line = assert_one_line(run(nowhere, "work", "redbike:RoundRobin('A')", f"--concurrency={value}"))
    assert "--concurrency must be" in line and "256" in line


def test_concurrency_256_is_accepted_by_the_check(nowhere):
    # Passes the usage check, then fails at the unreachable Redis (exit 1).
    line = assert_one_line(run(nowhere, "work", "redbike:RoundRobin('A')", "--concurrency=256"), code=1)
    assert "cannot reach Redis" in line


def test_help_states_the_concurrency_bound(tmp_path):
    result = run(tmp_path, "--help")
    assert result.returncode == 0 and "1 to 256" in result.stdout


@pytest.mark.parametrize(
    "spec",
    [
        "os:system('touch {marker}')",
        "builtins:exec('open(\"{marker}\", \"w\").close()')",
        "subprocess:call(['touch', '{marker}'])",
        "sys:exit",
        "sys:exit(0)",
        "builtins:dict",
        "notworker:Plain('A')",
    ],
)
@pytest.mark.parametrize("command", ["work", "dispatch"])
def test_worker_spec_that_is_not_a_roundrobin_is_refused_uncalled(nowhere, spec, command):
    marker = nowhere / "marker"
    line = assert_one_line(run(nowhere, command, spec.format(marker=marker)))
    assert "is not a class deriving from redbike.RoundRobin" in line
    assert not marker.exists() and not (nowhere / "constructed").exists()


def test_worker_in_config_that_is_not_a_roundrobin(nowhere):
    marker = nowhere / "marker"
    conf = nowhere / ".redbike.conf"
    conf.write_text(f"[redbike]\nworker = os:system('touch {marker}')\n\n" + conf.read_text())
    line = assert_one_line(run(nowhere, "work"))
    assert "is not a class deriving from redbike.RoundRobin" in line
    assert not marker.exists()


@pytest.mark.parametrize(
    "setting",
    [
        "encoding = rot13",
        "encoding_errors = bogus",
        "socket_connect_timeout = 1e300",
        "socket_timeout = inf",
        "socket_read_size = 0",
        "port = 0",
        "port = 99999",
    ],
)
def test_bad_redis_setting_is_one_line(nowhere, setting):
    conf = nowhere / ".redbike.conf"
    conf.write_text(conf.read_text().replace("socket_connect_timeout = 1\n", "") + setting + "\n")
    line = assert_one_line(run(nowhere, "statuses"))
    assert f"[redbike-redis] {setting.split()[0]}" in line


def test_idle_dispatcher_and_worker_outlive_a_short_socket_timeout(workdir, client, prefix, tmp_path):
    """Both wait on pub/sub far longer than socket_timeout = 1 allows a read
    to take, then still dispatch and run a job."""
    conf = workdir / ".redbike.conf"
    conf.write_text(conf.read_text() + "socket_timeout = 1\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    daemons = Daemons(logs, dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        dispatcher = daemons.start("dispatch", cwd=workdir)
        worker = daemons.start("work", cwd=workdir)
        keys = Keys(prefix)
        wait_for(lambda: client.get(keys.dispatcher), what="the dispatcher to lead")
        wait_for(lambda: "slot(s) on queues" in daemons.log(worker), what="the worker to start")
        idle_until = time.monotonic() + 3
        # The idling itself is what is tested: nothing to wait for but time.
        wait_for(lambda: time.monotonic() >= idle_until, what="3 s of idling")
        assert dispatcher.poll() is None and worker.poll() is None
        assert run(workdir, "set", "after-idle:A", "NOW").returncode == 0
        bike = Redbike(client=client, prefix=prefix)
        wait_for(
            lambda: ("after-idle:A", "END") in {(job, event) for job, event, _ in bike.statuses()},
            what="the job to run after the idle time",
        )
        log = daemons.log(dispatcher) + daemons.log(worker)
        assert "Timeout" not in log and "Redis error" not in log, log
    finally:
        daemons.cleanup()


@pytest.mark.parametrize("name", ["db\n", "db\r", "d\x1bb", "d\x7fb", "db\u0085", "d b", "a|b"])
def test_resource_name_with_newline_or_control_character_is_refused(workdir, client, name):
    line = assert_one_line(run(workdir, "capacity", name, "3"))
    assert line.startswith(f"redbike: bad resource name {name!r}")
    assert run(workdir, "capacities").stdout == ""


def test_needs_with_bad_resource_name_is_refused(workdir, client):
    line = assert_one_line(run(workdir, "set", "j:A", "STOP", "--needs=host:a\nb"))
    assert "bad resource name 'host:a\\nb'" in line


@pytest.mark.parametrize("name", ["db\n", "d\x00b", "\x85", ""])
def test_check_name_matches_the_whole_name(name):
    with pytest.raises(ResourceError, match="bad resource name"):
        check_name(name)


def test_byte_order_mark_is_not_part_of_the_first_field(workdir, client):
    (workdir / "caps.csv").write_bytes("\ufeffdb,2\nhost:x,1\n".encode())
    assert run(workdir, "capacity", "--load=caps.csv").returncode == 0
    assert run(workdir, "capacities").stdout.splitlines() == ["db,2,0,0", "host:x,1,0,0"]


def test_dispatch_schedules_reports_what_was_bad(workdir, client, prefix, tmp_path):
    """A BOM does not become part of the first job id, and a bad needs cell is
    reported as bad needs, not as a bad schedule."""
    (workdir / "jobs.csv").write_bytes(
        "\ufefffirst:A,STOP\nbadneeds:A,STOP,host:x=abc\nbadschedule:A,sometimes\n".encode()
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    daemons = Daemons(logs, dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        dispatcher = daemons.start("dispatch", "--schedules=jobs.csv", cwd=workdir)
        wait_for(lambda: "started" in daemons.log(dispatcher), what="the dispatcher to start")
        log = daemons.log(dispatcher)
        assert "jobs.csv: badneeds:A: bad amount in needs 'abc': not a whole number" in log, log
        assert "jobs.csv: badschedule:A: bad schedule 'sometimes'" in log, log
        assert "bad schedule: badneeds" not in log
        jobs = dict(row.split(",", 1) for row in run(workdir, "schedules").stdout.splitlines())
        assert jobs.get("first:A") == "STOP" and "\ufefffirst:A" not in jobs
        assert "badneeds:A" not in jobs
    finally:
        daemons.cleanup()
