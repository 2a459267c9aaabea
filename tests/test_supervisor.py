"""The supervisor's handling of a slot whose child ended, in-process against
a real Redis server: what it records for the run the child left behind."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import pytest
import redis
from conftest import wait_for
from test_jobs import NOW, Env, stamp

from redbike import RoundRobin
from redbike.slot import Outcomes
from redbike.states import OK, Outcome
from redbike.supervisor import Ending, WorkerPool


@pytest.fixture
def env(client: redis.Redis, prefix: str) -> Env:
    return Env(client, prefix)


def test_a_killed_child_whose_work_completed_ends_as_what_it_was(env: Env) -> None:
    """The child recorded its run's outcome, then was killed (a forced stop)
    before Redis heard of it: the supervisor ends it ok, not EXP."""
    env.bike.set("done:A", "NOW")
    pool = env.pool(concurrency=1)
    job = env.claim(pool)
    pool.outcomes.write(0, job.lease.token, Outcome("ok"), "")
    pool.board.count_run(0)  # as the child does
    env.at(NOW + 3)
    pool._end_runs_of_dead_child(0, Ending("killed: stopped by force"))
    assert env.status("done:A") == stamp("END", NOW + 3)
    assert env.errors() == {} and env.leases() == {}
    assert pool.jobs_done == 1 and pool.board.runs(0) == []


def test_a_killed_child_that_failed_keeps_its_error(env: Env) -> None:
    env.bike.set("bad:A", "NOW")
    pool = env.pool(concurrency=1)
    job = env.claim(pool)
    pool.outcomes.write(0, job.lease.token, Outcome("error", error="ValueError: no\0pe"), "Traceback ...")
    pool._end_runs_of_dead_child(0, Ending("killed: stopped by force"))
    assert env.errors()["bad:A"]["error"] == "ValueError: no pe"
    assert env.errors()["bad:A"]["traceback"] == "Traceback ..." and env.status("bad:A") == stamp("DIE", NOW)


def test_the_outcome_of_most_runs_is_recorded_as_any_other() -> None:
    """A run that returned None (states.OK) is written by a shortcut: the
    same bytes as any outcome, read back the same, over a longer record."""
    general, shortcut = Outcomes(1), Outcomes(1)
    for outcomes in (general, shortcut):
        outcomes.write(0, "0123456789abcdef", Outcome("error", error="ValueError: x"), "Traceback " * 100)
    general.write(0, "fedcba9876543210", Outcome("ok"), "")
    shortcut.write(0, "fedcba9876543210", OK, "")
    assert shortcut.memory[:] == general.memory[:]
    assert shortcut.read(0, "fedcba9876543210") == (OK, "")
    assert shortcut.read(0, "0123456789abcdef") is None
    shortcut.write(0, "0123456789abcdef", Outcome("ok", backoff=7), "")
    assert shortcut.read(0, "0123456789abcdef") == (Outcome("ok", backoff=7), "")


def test_an_outcome_of_an_earlier_run_is_not_taken_for_the_current_one(env: Env) -> None:
    env.bike.set("again:A", "NOW")
    pool = env.pool(concurrency=1)
    env.claim(pool)
    pool.outcomes.write(0, "an-earlier-token", Outcome("ok"), "")
    pool._end_runs_of_dead_child(0, Ending("killed: stopped by force"))
    assert env.status("again:A") == stamp("EXP", NOW)
    assert env.errors()["again:A"]["error"] == "killed: stopped by force"
    assert pool.jobs_done == 1


def test_a_forced_stop_leaves_the_lease_when_redis_is_down(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.bike.set("stuck:A", "NOW")
    pool = env.pool(concurrency=1)
    env.claim(pool)
    before = env.snapshot("A")

    def down(*_: object, **__: object) -> None:
        raise redis.ConnectionError("Connection refused")

    pool.claims.scripts.run = down  # type: ignore[method-assign]
    pool.forced.set()
    with caplog.at_level(logging.WARNING, "redbike"):
        pool._end_runs_of_dead_child(0, Ending("killed: stopped by force"))
    assert env.snapshot("A") == before  # the reaper's to end
    assert pool.board.runs(0) == [] and pool.jobs_done == 1
    assert "job stuck:A: killed: stopped by force; Redis is unreachable (Connection refused): " \
           "its lease is left to the dispatcher's reaper" in caplog.text


def test_a_pool_with_local_resources_leaves_no_lock_file(env: Env, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock between a pool's processes exists only while the pool runs, and
    its file has no name: neither a pool that never runs nor one that ran
    leaves a file in the temporary folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pool = WorkerPool(env.c, env.keys, RoundRobin("A"), resources={"cpu": 2})
    assert pool.claims.local_lock is None
    thread = threading.Thread(target=pool.run)
    thread.start()
    try:
        wait_for(lambda: pool.claims.local_lock, what="the pool's lock")
        assert list(tmp_path.iterdir()) == []
    finally:
        env.bike.control()  # HALT
        thread.join(20)
    assert not thread.is_alive()
    assert list(tmp_path.iterdir()) == []
