"""Job payloads: set --data, self.data in work(), tell, removal with the job,
the size limit and bad input."""

from __future__ import annotations

import json

import pytest
from conftest import wait_for
from test_jobs import NOW, Env
from test_processes import cli, cli_ok, starts

from redbike.records import DataError, decode_data, encode_data
from redbike.roundrobin import Lease, RoundRobin
from redbike.slot import run_work
from redbike.states import Outcome


@pytest.fixture
def env(c, prefix: str) -> Env:
    return Env(c, prefix)


PAYLOAD = {"url": "https://example.org/a b.png", "sizes": [64, 256], "note": "é|\n"}


def test_a_payload_goes_with_the_claim_and_is_kept_until_dropped(env: Env) -> None:
    env.bike.set("p:A", "NOW", data=PAYLOAD)
    assert env.c.hget(env.keys.data, "p:A") == encode_data(PAYLOAD)
    assert json.loads(env.bike.tell("p:A")["data"]) == PAYLOAD
    job = env.claim()
    assert job is not None and decode_data(job.data) == PAYLOAD
    env.bike.set("p:A", "NOW")  # set again without data: it keeps its payload (for the next run)
    assert decode_data(env.c.hget(env.keys.data, "p:A")) == PAYLOAD
    env.bike.set("p:A", "NOW", data=None)  # None drops it
    assert env.c.hget(env.keys.data, "p:A") is None and "data" not in env.bike.tell("p:A")
    env.bike.set("q:A", "NOW")
    assert env.c.hget(env.keys.data, "q:A") is None


def test_a_payload_is_removed_with_its_job(env: Env) -> None:
    env.bike.set("u:A", "FREQ=DAILY", data=[1, 2])
    env.bike.unset("u:A")
    assert env.c.hget(env.keys.data, "u:A") is None
    env.bike.set("e:A", "NOW", data="x")  # a one-off keeps it while its record is kept
    pool = env.pool()
    assert pool.finish(env.claim(pool), Outcome("ok"), "", None, "w1")[0] == "DONE"
    assert env.c.hget(env.keys.data, "e:A") == '"x"'
    dispatcher = env.dispatcher()
    later = NOW + 8 * 86400  # past keep-finished
    assert dispatcher.lead(later) and dispatcher.retire(later) == 2  # u:A (unset) and e:A
    assert env.c.hget(env.keys.data, "e:A") is None


def test_bad_payloads_are_refused_and_nothing_is_stored(env: Env) -> None:
    env.bike.max_data_bytes = 100
    with pytest.raises(DataError, match="more than max-data-bytes"):
        env.bike.set("big:A", "NOW", data="x" * 200)
    with pytest.raises(DataError, match="must be JSON"):
        env.bike.set("obj:A", "NOW", data=object())
    with pytest.raises(DataError, match="must be JSON"):
        env.bike.set("nan:A", "NOW", data=float("nan"))
    assert env.c.hgetall(env.keys.schedules) == {} and env.c.hgetall(env.keys.data) == {}
    results = env.bike.set_alike([("ok:A", None, {"n": 1}), ("big:A", None, "x" * 200), ("plain:A", None)], "NOW")
    assert results["ok:A"] == "PLACED" and results["plain:A"] == "PLACED"
    assert isinstance(results["big:A"], DataError)
    assert env.c.hgetall(env.keys.data) == {"ok:A": '{"n":1}'}


class Sees(RoundRobin):
    def work(self, jobid: str) -> None:
        self.seen = (jobid, self.data)


def test_work_sees_the_payload_as_self_data() -> None:
    worker = Sees("A")
    lease = Lease("j:A", "t", "A", "w", NOW, 10)
    assert run_work(worker, lease, '{"a":[1]}') == (Outcome("ok"), "")
    assert worker.seen == ("j:A", {"a": [1]}) and worker.data is None  # only while work() runs
    run_work(worker, lease, "")
    assert worker.seen == ("j:A", None)
    outcome, _ = run_work(worker, lease, "{not json")  # written by a foreign client: the run fails
    assert outcome.kind == "error" and "stored data is not JSON" in outcome.error


def test_data_from_the_command_line_and_a_file_reaches_a_real_worker(workdir, client, prefix, daemons, testlog,
                                                                    process_env):
    cli_ok(workdir, process_env, "set", "inline:A", "NOW", '--data={"n": 1, "s": "a b"}')
    (workdir / "payload.json").write_text('["from", "a", "file"]')
    cli_ok(workdir, process_env, "set", "file:A", "NOW", "--data-file=payload.json")
    told = json.loads(cli_ok(workdir, process_env, "tell", "inline:A"))
    assert json.loads(told["data"]) == {"n": 1, "s": "a b"}
    (workdir / "jobs.csv").write_text('csv:A,NOW,,,,"{""from"": ""csv""}"\n')
    daemons.start("dispatch", "--schedules=jobs.csv", cwd=workdir)
    daemons.start("work", cwd=workdir)
    wait_for(lambda: len(starts(client, testlog)) == 3, timeout=20)
    seen = {record["job"]: record.get("data") for record in starts(client, testlog)}
    assert seen == {"inline:A": {"n": 1, "s": "a b"}, "file:A": ["from", "a", "file"], "csv:A": {"from": "csv"}}


@pytest.mark.parametrize("args, message", [
    (["--data={nope"], "the job's data is not JSON"),
    (["--data-file=missing.json"], "cannot read --data-file 'missing.json'"),
    (["--data=1", "--data-file=x"], "bad command line"),
])
def test_bad_data_on_the_command_line_is_one_line_and_exit_2(workdir, process_env, args, message):
    result = cli(workdir, process_env, "set", "bad:A", "NOW", *args)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert cli(workdir, process_env, "tell", "bad:A").returncode == 3  # nothing stored


def test_max_data_bytes_comes_from_the_config(workdir, process_env):
    config = workdir / ".redbike.conf"
    config.write_text(config.read_text().replace("[redbike]\n", "[redbike]\nmax-data-bytes = 10\n"))
    result = cli(workdir, process_env, "set", "big:A", "NOW", '--data="more than ten bytes"')
    assert result.returncode == 2 and "more than max-data-bytes (10)" in result.stderr
    cli_ok(workdir, process_env, "set", "small:A", "NOW", "--data=[1]")
