"""Jobs that need more than a capacity (issue #7, bug 3): they wait aside
instead of holding their line, and come back when the capacity grows.

In-process claims through the REnv helper of test_resources (fakeredis and
the real server), then real `redbike work` processes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis
from conftest import Daemons, redbike_command, wait_for
from test_resources import REnv, finish

from redbike.keys import Keys
from redbike.parking import Aside, SetAside, decode_parking, encode_parking
from redbike.records import decode_local_room, encode_local_room


@pytest.fixture
def env(c: redis.Redis, prefix: str) -> REnv:
    return REnv(c, prefix)


def aside(env: REnv) -> list[str]:
    """Job ids set aside, by resource and amount."""
    return [member.rsplit("|", 1)[1] for member in env.c.zrange(env.keys.aside, 0, -1)]


def test_a_global_need_over_capacity_does_not_hold_the_line(env: REnv) -> None:
    env.bike.set_capacity("db:x", 2)
    pool = env.pool()
    env.bike.set("big:A", "NOW", needs="db:x=3")
    env.bike.set("small1:A", "NOW", needs="db:x")
    env.bike.set("small2:A", "NOW", needs="db:x")
    first, second = env.claim(pool), env.claim(pool)
    assert {first.lease.jobid, second.lease.jobid} == {"small1:A", "small2:A"}
    assert env.usage() == {"db:x": 2} and env.parked() == [] and aside(env) == ["big:A"]
    assert env.waiting_for("big:A") == "needs 3 of db:x, capacity 2"
    assert env.bike.tell("big:A")["status"].startswith("ENQ:")
    assert env.capacities()["db:x"] == (2, 2, 1)  # it is counted as waiting
    # jobs set later still run while it waits aside
    finish(pool, first)
    env.bike.set("small3:A", "NOW", needs="db:x")
    third = env.claim(pool)
    assert third.lease.jobid == "small3:A"
    # the capacity grows: it comes back in line, and runs once the line lets it
    env.bike.set("small4:A", "NOW", needs="db:x")
    assert env.claim(pool) is None and env.parked() == [("db:x", "small4:A")]
    env.bike.set_capacity("db:x", 3)
    assert aside(env) == []
    assert env.parked() == [("db:x", "big:A"), ("db:x", "small4:A")]  # its age kept: first in line
    assert env.waiting_for("big:A") == "db:x"
    finish(pool, second)
    finish(pool, third)
    assert env.ready() == ["big:A"]
    big = env.claim(pool)
    assert big.lease.jobid == "big:A" and env.usage() == {"db:x": 3}
    finish(pool, big)
    assert env.claim(pool).lease.jobid == "small4:A"


def test_a_line_head_over_a_lowered_capacity_is_set_aside(env: REnv) -> None:
    env.bike.set_capacity("db:x", 3)
    pool = env.pool()
    env.bike.set("hold:A", "NOW", needs="db:x=3")
    env.bike.set("big:A", "NOW", needs="db:x=3")
    env.bike.set("small:A", "NOW", needs="db:x")
    hold = env.claim(pool)
    assert env.claim(pool) is None and env.parked() == [("db:x", "big:A"), ("db:x", "small:A")]
    env.bike.set_capacity("db:x", 2)  # big can never fit now: it leaves the line
    assert env.parked() == [("db:x", "small:A")] and aside(env) == ["big:A"]
    assert env.waiting_for("big:A") == "needs 3 of db:x, capacity 2"
    finish(pool, hold)
    assert env.claim(pool).lease.jobid == "small:A"
    env.bike.set_capacity("db:x", None)  # unlimited: it fits
    assert aside(env) == [] and env.ready() == ["big:A"]
    assert env.claim(pool).lease.jobid == "big:A"


def test_capacity_zero_still_pauses_in_line(env: REnv) -> None:
    env.bike.set_capacity("db:x", 0)
    env.bike.set("a:A", "NOW", needs="db:x")
    assert env.claim() is None
    assert env.parked() == [("db:x", "a:A")] and aside(env) == []


def test_a_paused_line_unpaused_too_small_sets_its_new_head_aside(env: REnv) -> None:
    """Regression (found by the property test): raising a paused capacity to
    less than the second job in line needs woke the first, and left the second
    at the head of the line, which it could never leave."""
    env.bike.set_capacity("db:x", 0)
    env.bike.set("small:A", "NOW", needs="db:x")
    env.bike.set("big:A", "NOW", needs="db:x=3")
    env.bike.set("after:A", "NOW", needs="db:x")
    assert env.claim() is None
    assert env.parked() == [("db:x", "small:A"), ("db:x", "big:A"), ("db:x", "after:A")]
    env.bike.set_capacity("db:x", 1)
    assert env.ready() == ["small:A"] and aside(env) == ["big:A"]
    assert env.parked() == [("db:x", "after:A")]
    assert env.waiting_for("big:A") == "needs 3 of db:x, capacity 1"


def test_unset_and_set_take_a_job_out_of_aside(env: REnv) -> None:
    env.bike.set_capacity("db:x", 2)
    env.bike.set("gone:A", "NOW", needs="db:x=3")
    env.bike.set("moved:A", "NOW", needs="db:x=3")
    env.bike.set("fixed:A", "NOW", needs="db:x=3")
    assert env.claim() is None and len(aside(env)) == 3
    assert env.bike.unset("gone:A")
    env.bike.set("moved:A", "AT:2030-01-01T00:00:00Z", needs="db:x=3")
    env.bike.set("fixed:A", "NOW", needs="db:x=2")  # needs changed: back to its queue
    assert aside(env) == []
    assert env.c.hgetall(env.keys.parking) == {}
    assert env.queue("A") == ["fixed:A"]
    assert env.claim().lease.jobid == "fixed:A"
    env.bike.set_capacity("db:x", 3)  # nothing comes back: nothing is aside
    assert env.parked() == [] and env.ready() == []


def test_a_local_need_over_the_pools_capacity_does_not_hold_the_queue(env: REnv) -> None:
    small = env.pool("A", resources={"slots": 2})
    env.bike.set("big:A", "NOW", needs="worker:slots=3")
    env.bike.set("small:A", "NOW", needs="worker:slots=1")
    job = env.claim(small)
    assert job.lease.jobid == "small:A"
    assert aside(env) == ["big:A"] and env.queue("A") == []
    assert env.waiting_for("big:A") == "needs 3 of worker:slots, capacity 2"
    assert env.claim(small) is None and aside(env) == ["big:A"]  # still too small
    finish(small, job)
    # a pool big enough finds it when it has nothing else to do
    large = env.pool("A", resources={"slots": 4})
    env.bike.set("other:A", "NOW", needs="worker:slots=1")
    assert env.claim(large).lease.jobid == "other:A"
    big = env.claim(large)
    assert big.lease.jobid == "big:A" and large.local_used == {"worker:slots": 4}
    assert aside(env) == [] and env.c.hgetall(env.keys.parking) == {}


def test_a_pool_without_local_resources_takes_local_jobs_set_aside(env: REnv) -> None:
    env.pool("A", resources={"slots": 2})
    env.bike.set("big:A", "NOW", needs="worker:slots=3")
    assert env.claim(env.pool("A", resources={"slots": 2})) is None and aside(env) == ["big:A"]
    assert env.claim(env.pool("B")) is None  # not its queue
    assert env.claim(env.pool("A")).lease.jobid == "big:A"  # to it they are unlimited


def test_a_job_aside_that_fits_but_not_now_goes_first_in_its_queue(env: REnv) -> None:
    env.bike.set("big:A", "NOW", needs="worker:slots=3")
    assert env.claim(env.pool("A", resources={"slots": 2})) is None
    large = env.pool("A", resources={"slots": 4})
    env.bike.set("hold:A", "NOW", needs="worker:slots=2")
    hold = env.claim(large)
    assert hold.lease.jobid == "hold:A"
    assert env.claim(large) is None  # 3 of 4 do not fit beside 2: first in its queue
    assert aside(env) == [] and env.queue("A") == ["big:A"]
    finish(large, hold)
    assert env.claim(large).lease.jobid == "big:A"


def test_a_claims_local_room_is_checked_before_any_write(env: REnv) -> None:
    env.bike.set("a:A", "NOW")
    queue = [env.keys.queue("A")]
    for room in ("worker:slots=3/2", "worker:slots=1", "slots=1/2", "worker:slots=1/99999999999"):
        with pytest.raises(redis.ResponseError, match="BADARG"):
            env.bike.scripts.run("claim", env.clock.now, queue, ["tok", "w1", "", room, "A", "10", "10"])
    assert env.queue("A") == ["a:A"]


def test_local_room_and_aside_records_round_trip() -> None:
    room = encode_local_room({"worker:b": 1, "worker:a": 0}, {"worker:a": 4, "worker:b": 2})
    assert room == "worker:a=0/4,worker:b=1/2"
    assert decode_local_room(room) == {"worker:a": (0, 4), "worker:b": (1, 2)}
    assert encode_local_room({}, {}) == ""
    value = SetAside(2, Aside("worker:slots", 3, "0000000000000007", "A", "big|x:A"))
    assert decode_parking(encode_parking(value)) == value


# ============================================================ real processes


def aside_jobs(client: redis.Redis, keys: Keys) -> list[str]:
    return [member.rsplit("|", 1)[1] for member in client.zrange(keys.aside, 0, -1)]


def test_a_pool_with_two_slots_runs_the_jobs_behind_one_needing_three(
        workdir: Path, daemons: Daemons, client: redis.Redis, prefix: str) -> None:
    keys = Keys(prefix)
    testlog = f"{prefix}:testlog"

    def cli(*args: str) -> str:
        result = subprocess.run(redbike_command(*args), cwd=workdir, env=daemons.env, capture_output=True,
                                text=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def ended(job: str) -> bool:
        return any(r["job"] == job and r["event"] == "end" for r in map(json.loads, client.lrange(testlog, 0, -1)))

    small_pool = daemons.start("work", "--resources", "slots=2", cwd=workdir)
    wait_for(lambda: client.pubsub_numsub(keys.queue_channel("A"))[0][1] >= 1, what="the pool to listen")
    cli("set", "big:A", "NOW", "--needs=worker:slots=3")
    cli("set", "small:A", "NOW", "--needs=worker:slots=1")
    wait_for(lambda: ended("small:A"), what="small:A to run behind big:A")
    told = json.loads(cli("tell", "big:A"))
    assert told["waiting_for"] == "needs 3 of worker:slots, capacity 2"
    assert not ended("big:A") and aside_jobs(client, keys) == ["big:A"]
    large_pool = daemons.start("work", "--resources", "slots=3", cwd=workdir)
    wait_for(lambda: ended("big:A"), what="the pool with three slots to run big:A")
    assert aside_jobs(client, keys) == []
    cli("control", "HALT")
    assert small_pool.wait(10) == 0 and large_pool.wait(10) == 0
