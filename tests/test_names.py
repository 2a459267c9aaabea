"""Names users give redbike (issue #7, bug 9): a '|' in a queue name crashed
every dispatcher for good, since lease, parked and ready records join their
fields with '|'. Job ids and queue names are checked where they enter, and
records written before that (or by a foreign client) still decode.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis
from test_hostile import dump_all
from test_jobs import NOW, Env

from redbike import RoundRobin
from redbike.api import JobIdError
from redbike.cli import main
from redbike.names import BadName, check_jobid, check_queue
from redbike.records import LeaseRecord, encode_lease
from redbike.report import tell

BAD_IDS = ["x:Q|x", "a|b", "", "   ", "a\nb:A", "a\rb", "nul\0:A", "esc\x1b[31m:A", "tab\tb", "del\x7f", "c1\x85"]


@pytest.fixture
def real(client: redis.Redis, prefix: str) -> Env:
    return Env(client, prefix)


@pytest.mark.parametrize("jobid", BAD_IDS)
def test_bad_job_ids_are_refused_in_one_line_and_store_nothing(real: Env, jobid: str) -> None:
    before = dump_all(real.c)
    for call in (lambda: real.bike.set(jobid, "NOW"), lambda: real.bike.set(jobid, "NOW", needs="r"),
                 lambda: real.bike.tell(jobid), lambda: real.bike.unset(jobid)):
        with pytest.raises(JobIdError) as raised:
            call()
        assert "\n" not in str(raised.value)
    assert dump_all(real.c) == before


class BarRouter(RoundRobin):
    """Routes every job to a queue whose name holds a '|'."""

    def queue_for(self, jobid: str) -> str:
        return "Q|" + jobid


def test_a_queue_name_with_a_bar_is_refused(client: redis.Redis, prefix: str) -> None:
    env = Env(client, prefix)
    env.bike.worker = BarRouter()
    before = dump_all(client)
    with pytest.raises(BadName, match="bad queue name 'Q|x'"):
        env.bike.set("x", "NOW")
    assert dump_all(client) == before


def test_the_checks() -> None:
    assert check_jobid("host-17:db42:A") == "host-17:db42:A"
    assert check_jobid("ünïcode jöb:A") == "ünïcode jöb:A"
    assert check_queue("A") == "A"
    for bad in BAD_IDS:
        with pytest.raises(BadName):
            check_jobid(bad)
        with pytest.raises(BadName):
            check_queue(bad)


def test_the_cli_refuses_a_bar_in_one_line(client: redis.Redis, prefix: str, workdir: Path, monkeypatch,
                                           capsys) -> None:
    monkeypatch.chdir(workdir)
    for command in (["set", "x:Q|x", "NOW"], ["tell", "x:Q|x"], ["unset", "x:Q|x"], ["set", "a\nb", "NOW"]):
        assert main(["--config", ".redbike.conf", *command]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert client.keys(f"{prefix}:*") == []


def _stored_lease(env: Env, jobid: str, queue: str) -> None:
    """A run of ``jobid`` on ``queue``, as a redbike before this fix (or a
    foreign client) stored it: the worker was then killed."""
    env.c.hset(env.keys.schedules, jobid, "NOW")
    env.c.hset(env.keys.statuses, jobid, f"WRK:{NOW:.0f}")
    env.c.hset(env.keys.leases, jobid, encode_lease(LeaseRecord("tok", queue, "w1", NOW, 10.0, NOW, 1, "")))
    env.c.zadd(env.keys.deadlines, {jobid: NOW + 10})


def test_the_reaper_survives_a_lease_whose_queue_holds_a_bar(real: Env, caplog: pytest.LogCaptureFixture) -> None:
    _stored_lease(real, "x:Q|x", "Q|x")
    _stored_lease(real, "y:A", "A")  # an ordinary run expired at the same time
    dispatcher = real.dispatcher()
    assert dispatcher.lead(NOW + 20)
    with caplog.at_level(logging.WARNING, logger="redbike.dispatcher"):
        assert dispatcher.reap(NOW + 20) == 2  # was: ValueError: could not convert string to float
    # bug 8: the log says where the job went, not Placement(kind='T', ...)
    assert "job y:A: lease of worker w1 expired; back in the timeline for 2023-11-14T22:13:40Z (status EXP)" \
        in caplog.messages
    assert not any("Placement(" in message for message in caplog.messages)
    assert real.leases() == {}
    for jobid in ("x:Q|x", "y:A"):
        assert real.status(jobid) == f"EXP:{NOW + 20:.0f}"
        assert real.timeline()[jobid] == NOW + 20
        assert "worker w1 stopped renewing it (20s after" in real.errors()[jobid]["error"]


def test_tell_reads_a_lease_whose_queue_holds_a_bar(real: Env) -> None:
    _stored_lease(real, "x:Q|x", "Q|x")
    told = tell(real.c, real.keys, "x:Q|x", "Q|x")  # was: ValueError: too many values to unpack
    assert told is not None
    assert told["lease"] == {"worker": "w1", "queue": "Q|x", "since": NOW, "timeout": 10.0,
                             "deadline": NOW + 10, "token": "tok", "holds": None}


def test_a_job_on_a_bar_queue_never_parks_or_wakes(real: Env) -> None:
    """Was: a job 'x:Q|x' parked on r was woken under the id 'x' (the queue
    split at its '|'), leaving a parking entry for a job that does not exist."""
    real.bike.set_capacity("r", 0)
    before = dump_all(real.c)
    with pytest.raises(BadName):
        real.bike.set("x:Q|x", "NOW", needs="r")
    assert dump_all(real.c) == before
    # A foreign client's claim from such a queue is refused before it writes.
    with pytest.raises(redis.ResponseError, match="BADARG bad queue name"):
        real.bike.scripts.run("claim", NOW, [real.keys.queue("Q|x")], ["tok", "w1", "", "", "Q|x", "10", "10"])
    assert dump_all(real.c) == before
