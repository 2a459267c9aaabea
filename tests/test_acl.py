"""Least privilege: an ACL user restricted to the deployment's keys
(``~P:*``), channels (``&P:*``) and the commands of the README's ACL SETUSER
line runs every command and daemon redbike has; Redis refuses it anything
else. The line is read from the README, so the README stays true."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import ROOT, wait_for
from servers import Server, write_redis_config
from test_processes import cli_ok, ends, halt, leads, records

from redbike import Redbike, RoundRobin
from redbike.keys import Keys
from redbike.records import decode_claim
from redbike.scripts import Scripts

PASSWORD = "acl-test-secret"


def acl_line(prefix: str) -> list[str]:
    """The README's ACL SETUSER line for ``prefix``, as arguments."""
    found = re.findall(r"^ACL SETUSER redbike .*$", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert len(found) == 1, found
    return found[0].replace("myapp", prefix).replace(">s3cret", f">{PASSWORD}").split()


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[Server]:
    server = Server(tmp_path / "acl-redis", []).start()
    yield server
    server.kill()


def test_a_least_privilege_user_runs_everything(tmp_path, acl_server, client, prefix, daemons, testlog, process_env):
    env = process_env
    admin = acl_server.client()
    assert admin.execute_command(*acl_line(prefix)) in ("OK", True)
    admin.execute_command("ACL", "LOG", "RESET")
    home = write_redis_config(tmp_path / "home", prefix,
                              f"url = redis://redbike:{PASSWORD}@127.0.0.1:{acl_server.port}/0\n")
    keys = Keys(prefix)
    dispatcher = daemons.start("dispatch", cwd=home)
    worker = daemons.start("work", "--concurrency", "2", "--resources", "db=1", cwd=home)
    wait_for(lambda: leads(admin, keys), what="the dispatcher to lead")

    cli_ok(home, env, "capacity", "db", "1")
    cli_ok(home, env, "set", "now-1:A", "NOW", "--needs", "db")
    cli_ok(home, env, "set", "fail-1:B", "NOW")
    cli_ok(home, env, "set", "secondly:B", "FREQ=SECONDLY;INTERVAL=1")
    wait_for(lambda: ends(client, testlog, "now-1:A") and ends(client, testlog, "fail-1:B")
             and ends(client, testlog, "secondly:B"), timeout=20, what="the jobs to run")
    wait_for(lambda: (admin.hget(keys.statuses, "fail-1:B") or "").startswith("DIE:"), what="fail-1:B to fail")
    cli_ok(home, env, "retry", "fail-1:B")
    wait_for(lambda: len(ends(client, testlog, "fail-1:B")) == 2, timeout=20, what="the retried job to run again")

    statuses = {row[0]: row[1] for row in csv.reader(io.StringIO(cli_ok(home, env, "statuses")))}
    assert statuses["now-1:A"] == "END", statuses
    assert json.loads(cli_ok(home, env, "tell", "fail-1:B"))["last_error"]["status"] == "DIE"
    assert "secondly:B" in cli_ok(home, env, "schedules")
    assert "db" in cli_ok(home, env, "capacities")
    assert json.loads(cli_ok(home, env, "info", "--json"))["redis"]["address"] == f"127.0.0.1:{acl_server.port}"
    cli_ok(home, env, "explain", "secondly:B")
    cli_ok(home, env, "nodes")
    cli_ok(home, env, "unset", "secondly:B")
    halt(home, env, dispatcher, worker)
    assert {r["pid"] for r in records(client, testlog)}, "no job ran"

    # Nothing redbike did was refused (a refused command would only show as retries in the logs).
    assert admin.execute_command("ACL", "LOG") == []
    assert "cmdstat_fcall" in admin.info("commandstats")  # the slots' claims and finishes went as functions

    # The restriction is real: another command, another prefix's key, another channel.
    user = redis.Redis(port=acl_server.port, username="redbike", password=PASSWORD, decode_responses=True)
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.flushall()
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.get(f"other{prefix}:schedules")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.publish("other:wake-dispatcher", "x")
    with pytest.raises(redis.exceptions.NoPermissionError):
        user.eval("return redis.call('GET', KEYS[1])", 1, f"other{prefix}:x")
    assert len(admin.execute_command("ACL", "LOG")) == 4


def test_a_user_that_may_not_load_functions_claims_by_evalsha(acl_server, prefix) -> None:
    """Without ``+fcall +function|load`` the slots' claims go as EVALSHA (Redis
    6.2's way): one refusal, the same replies."""
    admin = acl_server.client()
    line = [word for word in acl_line(prefix) if word not in ("+fcall", "+function|load")]
    assert len(line) == len(acl_line(prefix)) - 2
    assert admin.execute_command(*line) in ("OK", True)
    admin.execute_command("ACL", "LOG", "RESET")
    user = redis.Redis(port=acl_server.port, username="redbike", password=PASSWORD, decode_responses=True)
    keys = Keys(prefix)
    Redbike(RoundRobin(), prefix=prefix, client=user).set("one:A", "NOW")
    scripts = Scripts(user, keys)
    connection = user.connection_pool.get_connection()
    try:
        reply = scripts.run("claim", time.time(), [keys.queue("A")], ["t", "w", "", "", "A", "10", "12"],
                            client=connection)
    finally:
        user.connection_pool.release(connection)
    assert decode_claim(reply).jobid == "one:A"  # type: ignore[union-attr]
    assert scripts.fcall is False
    assert [entry["object"] for entry in admin.execute_command("ACL", "LOG")] == ["function|load"]
    assert "cmdstat_fcall" not in admin.info("commandstats")


def test_a_flushed_library_that_may_no_longer_be_loaded_falls_back_to_evalsha(acl_server, prefix) -> None:
    """The slots ran as functions; the library is flushed and the user may no
    longer load it: the next claim goes as EVALSHA instead of failing for ever."""
    admin = acl_server.client()
    assert admin.execute_command(*acl_line(prefix)) in ("OK", True)
    user = redis.Redis(port=acl_server.port, username="redbike", password=PASSWORD, decode_responses=True)
    keys = Keys(prefix)
    for jobid in ("one:A", "two:A"):
        Redbike(RoundRobin(), prefix=prefix, client=user).set(jobid, "NOW")
    scripts = Scripts(user, keys)
    connection = user.connection_pool.get_connection()
    try:
        def claim(token: str) -> str:
            reply = scripts.run("claim", time.time(), [keys.queue("A")], [token, "w", "", "", "A", "10", "12"],
                                client=connection)
            return decode_claim(reply).jobid  # type: ignore[union-attr]

        assert claim("t1") == "one:A" and scripts.fcall is True
        admin.function_flush()
        admin.execute_command("ACL", "SETUSER", "redbike", "-function|load")
        assert claim("t2") == "two:A" and scripts.fcall is False
    finally:
        user.connection_pool.release(connection)
