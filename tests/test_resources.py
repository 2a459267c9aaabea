"""Resource gating (issue #3): capacities, needs, parking, wake-ups.

1. The logic, driven through Redbike / WorkerPool / Dispatcher with an
   injected clock, on fakeredis (with lupa) and on the real redis-server.
2. A property-based test: random claim / finish / crash / capacity / set /
   unset sequences against a model of the counters (fakeredis).
3. Real `redbike work` and `redbike dispatch` processes on the real server.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis
from conftest import Daemons, redbike_command, script_calls, wait_for, worker_of
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pooltools import ClaimingPool
from test_jobs import NOW, Env, Worker, stamp

from redbike import Redbike, RoundRobin
from redbike.api import read_schedules_csv
from redbike.claims import GRACE_SECONDS, Rotation
from redbike.cli import main
from redbike.csvfile import CsvError
from redbike.keys import WAKE_BATCH, Keys
from redbike.records import JobRecord, decode_job, encode_job
from redbike.resources import ResourceError
from redbike.scripts import subscribe
from redbike.states import Outcome

# ===================================================================== helpers


class REnv(Env):
    """Env with readers for the resource keys."""

    def usage(self) -> dict[str, int]:
        return {name: int(amount) for name, amount in self.c.hgetall(self.keys.usage).items()}

    def parked(self) -> list[tuple[str, str]]:
        """(resource, jobid) of every parked job, in line order."""
        members = self.c.zrange(self.keys.parked, 0, -1)
        return [(m.split("|", 3)[0], m.split("|", 3)[3]) for m in members]

    def ready(self) -> list[str]:
        return [m.split("|", 2)[2] for m in self.c.zrange(self.keys.ready, 0, -1)]

    def waiting_for(self, jobid: str) -> str | None:
        told = self.bike.tell(jobid)
        return None if told is None else told.get("waiting_for")

    def capacities(self) -> dict[str, tuple[int | None, int, int]]:
        return {r: (cap, used, waiting) for r, cap, used, waiting in self.bike.capacities()}


@pytest.fixture
def env(c: redis.Redis, prefix: str) -> REnv:
    return REnv(c, prefix)


@pytest.fixture
def real(client: redis.Redis, prefix: str) -> REnv:
    """The real server only."""
    return REnv(client, prefix)


def finish(pool: ClaimingPool, job, outcome: str = "ok", error: str = "") -> str:
    done, nxt = pool.finish(job, Outcome(outcome, error=error), "", None, "w1")
    assert nxt is None
    return done


def count_scripts(pool: ClaimingPool) -> Counter:
    """Count the scripts a pool runs (by name)."""
    calls: Counter = Counter()
    run = pool.scripts.run

    def counting(name: str, *args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return run(name, *args, **kwargs)

    pool.scripts.run = counting  # type: ignore[method-assign]
    return calls


# ============================================================ 1. the logic


def test_claim_takes_all_needs_or_none(env: REnv) -> None:
    env.bike.set_capacity("db:x", 1)
    env.bike.set_capacity("host:b", 1)
    pool = env.pool()
    env.bike.set("holder:A", "NOW", needs="host:b")
    holder = env.claim(pool)
    assert env.usage() == {"host:b": 1}
    env.bike.set("both:A", "NOW", needs="db:x,host:b")  # db:x (looked at first) has room, host:b not
    assert env.claim(pool) is None
    # nothing of db:x was taken: the job waits for host:b
    assert env.usage() == {"host:b": 1}
    assert env.parked() == [("host:b", "both:A")]
    assert env.waiting_for("both:A") == "host:b"
    assert env.leases().keys() == {"holder:A"}
    # meanwhile db:x is all there for another job
    env.bike.set("x:B", "NOW", needs="db:x")
    x = env.claim(pool)
    assert x.lease.jobid == "x:B"
    finish(pool, x)
    finish(pool, holder)
    job = env.claim(pool)
    assert job.lease.jobid == "both:A"
    assert env.usage() == {"db:x": 1, "host:b": 1}
    assert env.leases()["both:A"].endswith("|db:x=1,host:b=1")  # the lease records what it holds
    assert env.bike.tell("both:A")["lease"]["holds"] == "db:x=1,host:b=1"
    finish(pool, job)
    assert env.usage() == {}


def test_amounts_count_against_capacity(env: REnv) -> None:
    env.bike.set_capacity("db:x", 3)
    pool = env.pool()
    env.bike.set("two:A", "NOW", needs="db:x=2")
    env.bike.set("two-more:A", "NOW", needs="db:x=2")
    env.bike.set("one:B", "NOW", needs="db:x")
    first = env.claim(pool)
    assert first.lease.jobid == "two:A" and env.usage() == {"db:x": 2}
    # 2 + 2 > 3: parked; and the job of B, which would fit, does not overtake it
    assert env.claim(pool) is None
    assert env.parked() == [("db:x", "two-more:A"), ("db:x", "one:B")]
    finish(pool, first)
    assert env.ready() == ["two-more:A", "one:B"] and env.parked() == []
    assert env.usage() == {"db:x": 3}  # set aside for the two woken jobs
    assert [env.claim(pool).lease.jobid for _ in range(2)] == ["two-more:A", "one:B"]
    assert env.usage() == {"db:x": 3}


def test_parks_on_the_first_saturated_resource_and_wakes_in_order(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    env.bike.set_capacity("host:b", 1)
    pool = env.pool()
    env.bike.set("hold-a:A", "NOW", needs="host:a")
    env.bike.set("hold-b:A", "NOW", needs="host:b")
    holders = [env.claim(pool), env.claim(pool)]
    for i in range(3):
        env.bike.set(f"w{i}:A", "NOW", needs="host:a,host:b")  # both saturated: parks on the first
    env.bike.set("only-b:B", "NOW", needs="host:b")
    assert env.claim(pool) is None
    assert env.parked() == [("host:a", "w0:A"), ("host:a", "w1:A"), ("host:a", "w2:A"), ("host:b", "only-b:B")]
    assert env.capacities() == {"host:a": (1, 1, 3), "host:b": (1, 1, 1)}
    assert [env.waiting_for(f"w{i}:A") for i in range(3)] == ["host:a"] * 3
    assert env.queue("A") == [] and env.queue("B") == []
    # host:a frees: w0 wakes (only w0: one place), finds host:b busy and gets in
    # line there, in its turn; its place on host:a goes to w1, which does the same ...
    finish(pool, holders[0])
    assert env.ready() == ["w0:A"]
    assert env.usage() == {"host:a": 1, "host:b": 1}  # host:a set aside for w0
    assert env.claim(pool) is None
    assert env.parked() == [("host:b", "w0:A"), ("host:b", "w1:A"), ("host:b", "w2:A"), ("host:b", "only-b:B")]
    assert env.ready() == [] and env.usage() == {"host:b": 1}
    assert env.waiting_for("w0:A") == "host:b"
    # host:b frees: the jobs run one at a time, in the order they came
    finish(pool, holders[1])
    order = []
    while (job := env.claim(pool)) is not None:
        order.append(job.lease.jobid)
        finish(pool, job)
    assert order == ["w0:A", "w1:A", "w2:A", "only-b:B"]
    assert env.usage() == {} and env.parked() == [] and env.ready() == []


def test_wake_ups_are_in_line_order(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    env.bike.set("hold:A", "NOW", needs="host:a")
    job = env.claim(pool)
    for name in ("p1:B", "p2:A", "p3:B", "p4:A"):
        env.bike.set(name, "NOW", needs="host:a")
        assert env.claim(pool) is None
    assert [j for _, j in env.parked()] == ["p1:B", "p2:A", "p3:B", "p4:A"]
    started = []
    for _ in range(4):
        finish(pool, job)
        assert len(env.ready()) == 1  # one place: one woken
        job = env.claim(pool)
        started.append(job.lease.jobid)
    assert started == ["p1:B", "p2:A", "p3:B", "p4:A"]


def test_no_head_of_line_blocking(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    env.bike.set_capacity("host:b", 1)
    pool = env.pool("A")
    env.bike.set("hold:A", "NOW", needs="host:a")
    holder = env.claim(pool)
    for name, needs in (("a1:A", "host:a"), ("a2:A", "host:a"), ("b1:A", "host:b")):
        env.bike.set(name, "NOW", needs=needs)
    assert env.queue("A") == ["b1:A", "a2:A", "a1:A"]  # a1 next
    job = env.claim(pool)
    assert job.lease.jobid == "b1:A"
    assert env.parked() == [("host:a", "a1:A"), ("host:a", "a2:A")]
    assert env.usage() == {"host:a": 1, "host:b": 1}
    finish(pool, holder)
    assert env.claim(pool).lease.jobid == "a1:A"


def test_a_free_job_is_found_behind_more_than_64_parked_ones(env: REnv) -> None:
    """A claim parks at most 64 jobs, then answers MORE; the pool claims again."""
    env.bike.set_capacity("db:x", 0)
    for i in range(150):
        env.bike.set(f"p{i:03d}:A", "NOW", needs="db:x")
    env.bike.set("free:A", "NOW", needs="host:free")
    pool = env.pool("A")
    calls = count_scripts(pool)
    job = env.claim(pool)
    assert job.lease.jobid == "free:A"
    assert calls["claim"] == 3  # 64 + 64 + 22 parked, the last claim also found free:A
    assert len(env.parked()) == 150 and env.queue("A") == []
    assert [j for _, j in env.parked()] == [f"p{i:03d}:A" for i in range(150)]


def test_a_free_job_is_found_behind_tens_of_thousands_parked_ones(real: REnv) -> None:
    """Regression: MORE was followed by recursion, so a claim behind 64,000
    jobs of a saturated resource raised RecursionError and its slot died."""
    env = real
    env.bike.set_capacity("db:x", 0)
    n = 66_000
    with env.c.pipeline(transaction=False) as pipe:
        for i in range(n):
            jobid = f"p{i}:A"
            pipe.hset(env.keys.schedules, jobid, "NOW")
            pipe.hset(env.keys.jobs, jobid, encode_job(JobRecord(needs="db:x=1")))
            pipe.hset(env.keys.statuses, jobid, stamp("ENQ", NOW))
            pipe.lpush(env.keys.queue("A"), jobid)
        pipe.execute()
    env.bike.set("free:A", "NOW")
    job = env.claim(env.pool("A"))
    assert job.lease.jobid == "free:A"
    assert env.c.zcard(env.keys.parked) == n


@pytest.mark.parametrize("outcome", ["ok", "error", "stop", "unset", "expired"])
def test_every_ending_releases_and_wakes_the_next(env: REnv, outcome: str) -> None:
    env.bike.set_capacity("host:a", 1)
    env.bike.set_capacity("db:x", 5)
    pool = env.pool()
    env.bike.set("r:A", "CONTINUE", needs="host:a,db:x=2")
    env.bike.set("w:B", "NOW", needs="host:a")
    job = env.claim(pool)
    assert job.lease.jobid == "r:A"
    assert env.claim(pool) is None  # w parks
    assert env.usage() == {"host:a": 1, "db:x": 2}
    env.at(NOW + 1)
    assert finish(pool, job, outcome, error="E: x" if outcome in ("error", "expired") else "") == "DONE"
    assert env.leases() == {}
    assert env.ready() == ["w:B"] and env.parked() == []
    assert env.usage() == {"host:a": 1}  # only the place set aside for w
    assert env.claim(pool).lease.jobid == "w:B"
    assert env.usage() == {"host:a": 1}


def test_the_claim_in_a_finish_takes_the_job_its_release_woke_first(env: REnv) -> None:
    """A finish's release wakes the job in line into the ready set, and the
    claim in the same round trip takes it before the queue's next job: the
    claim looks for woken jobs (and paused queues) only when it needs to, and
    must look after the release, not before."""
    env.bike.set_capacity("r", 1)
    pool = env.pool("A")
    rotation = Rotation(["A"])
    env.bike.set("run:A", "NOW", needs="r")
    job = pool.claim(rotation, "w1")
    env.bike.set("wait:A", "NOW", needs="r")
    assert pool.claim(rotation, "w1") is None  # parks
    env.bike.set("free:A", "NOW")
    assert env.ready() == [] and env.parked() == [("r", "wait:A")]
    env.at(NOW + 1)
    done, claimed = pool.finish(job, Outcome("ok"), "", rotation, "w1")
    assert done == "DONE" and claimed is not None and claimed.lease.jobid == "wait:A"
    assert env.queue("A") == ["free:A"] and env.ready() == [] and env.usage() == {"r": 1}


def test_unset_of_a_running_job_releases_when_it_ends(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    env.bike.set("r:A", "CONTINUE", needs="host:a")
    env.bike.set("w:A", "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    assert env.bike.unset("r:A") == 2
    assert env.usage() == {"host:a": 1} and env.parked() == [("host:a", "w:A")]  # it still runs
    assert finish(pool, job, "error", error="E: late") == "GONE"
    assert env.ready() == ["w:A"]
    assert env.claim(pool).lease.jobid == "w:A"
    env.assert_no_trace("r:A", "A")
    assert decode_job(env.c.hget(env.keys.jobs, "r:A")).needs == ""  # unset: its record keeps no needs


def test_reaped_lease_releases_and_wakes_the_next(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    env.bike.set("r:A", "NOW", needs="host:a")
    env.bike.set("w:A", "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    deadline = NOW + 10 + GRACE_SECONDS
    d = env.dispatcher()
    assert d.lead(deadline)
    assert d.reap(deadline) == 1
    assert env.leases() == {}
    assert env.usage() == {"host:a": 1}  # set aside for w
    assert env.ready() == ["w:A"] and env.parked() == []
    assert env.status("r:A") == stamp("EXP", deadline)
    env.at(deadline)
    nxt = env.claim(pool)
    assert nxt.lease.jobid == "w:A"
    # the late worker's finish changes nothing
    assert finish(pool, job) == "STALE"
    assert env.usage() == {"host:a": 1}
    finish(pool, nxt)
    assert env.usage() == {}  # the retry of r:A is in the timeline, holding nothing
    assert env.timeline() == {"r:A": deadline}


def test_release_publishes_a_wake_up_for_the_waiting_job_queue(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    env.bike.set("r:A", "NOW", needs="host:a")
    env.bike.set("w:B", "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    pubsub = subscribe(env.c, [env.keys.queue_channel("B")])
    try:
        finish(pool, job)
        message = wait_for(lambda: pubsub.get_message(timeout=0.1), timeout=2, what="a wake-up")
        assert message["channel"] == env.keys.queue_channel("B")
    finally:
        pubsub.close()


def test_capacity_zero_pauses_and_raising_it_wakes_as_many_as_fit(env: REnv) -> None:
    env.bike.set_capacity("db:x", 0)
    pool = env.pool()
    for i in range(5):
        env.bike.set(f"p{i}:A", "NOW", needs="db:x")
    assert env.claim(pool) is None
    assert len(env.parked()) == 5 and env.capacities() == {"db:x": (0, 0, 5)}
    assert env.bike.set_capacity("db:x", 2) == 2
    assert env.ready() == ["p0:A", "p1:A"]
    assert [env.claim(pool).lease.jobid for _ in range(2)] == ["p0:A", "p1:A"]
    assert env.claim(pool) is None
    assert env.capacities() == {"db:x": (2, 2, 3)}
    assert env.bike.set_capacity("db:x", 3) == 1
    assert env.claim(pool).lease.jobid == "p2:A"
    assert env.bike.set_capacity("db:x", 3) == 0  # no room: nothing more


def test_lowering_capacity_below_use_admits_nothing_until_below(env: REnv) -> None:
    env.bike.set_capacity("db:x", 3)
    pool = env.pool()
    for i in range(3):
        env.bike.set(f"r{i}:A", "NOW", needs="db:x")
    running = [env.claim(pool) for _ in range(3)]
    env.bike.set("w:A", "NOW", needs="db:x")
    assert env.claim(pool) is None
    assert env.bike.set_capacity("db:x", 1) == 0
    assert env.capacities() == {"db:x": (1, 3, 1)}
    finish(pool, running[0])
    assert env.ready() == [] and env.claim(pool) is None  # 2 in use, capacity 1
    finish(pool, running[1])
    assert env.ready() == [] and env.claim(pool) is None  # 1 in use: not below 1
    assert env.capacities() == {"db:x": (1, 1, 1)}
    finish(pool, running[2])
    assert env.claim(pool).lease.jobid == "w:A"
    assert env.usage() == {"db:x": 1}


def test_lowering_capacity_holds_back_jobs_already_woken(env: REnv) -> None:
    env.bike.set_capacity("db:x", 0)
    pool = env.pool()
    env.bike.set("w:A", "NOW", needs="db:x")
    assert env.claim(pool) is None
    env.bike.set_capacity("db:x", 1)
    assert env.ready() == ["w:A"]
    env.bike.set_capacity("db:x", 0)
    assert env.claim(pool) is None  # it goes back in line
    assert env.parked() == [("db:x", "w:A")] and env.usage() == {}


def test_unlimited_capacity_wakes_every_waiting_job(env: REnv) -> None:
    env.bike.set_capacity("db:x", 0)
    pool = env.pool()
    for i in range(5):
        env.bike.set(f"p{i}:A", "NOW", needs="db:x")
    assert env.claim(pool) is None
    assert env.bike.set_capacity("db:x", None) == 5
    assert env.parked() == []
    assert sorted(env.claim(pool).lease.jobid for _ in range(5)) == [f"p{i}:A" for i in range(5)]
    assert env.capacities() == {"db:x": (None, 5, 0)}


def test_unlimited_capacity_wakes_more_than_a_batch(real: REnv) -> None:
    env = real
    env.bike.set_capacity("db:x", 0)
    n = WAKE_BATCH + 5
    for i in range(n):
        env.bike.set(f"p{i}:A", "NOW", needs="db:x")
    assert env.claim(env.pool()) is None
    assert env.c.zcard(env.keys.parked) == n
    assert env.bike.set_capacity("db:x", None) == n
    assert env.c.zcard(env.keys.parked) == 0 and env.c.zcard(env.keys.ready) == n


def test_unset_of_a_parked_job_leaves_no_ghost(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    env.bike.set("r:A", "NOW", needs="host:a")
    env.bike.set("p:A", "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    assert env.waiting_for("p:A") == "host:a"
    assert env.bike.unset("p:A") == 1
    assert env.parked() == [] and env.bike.tell("p:A") is None
    env.assert_no_trace("p:A", "A")
    finish(pool, job)
    assert env.ready() == [] and env.claim(pool) is None  # no ghost claim
    assert env.usage() == {}


def test_set_of_a_parked_job_to_a_later_time_takes_it_out_of_line(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    env.bike.set("r:A", "NOW", needs="host:a")
    env.bike.set("p:A", "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    assert env.bike.set("p:A", f"AT:{NOW + 600:.0f}", needs="host:a") == "PLACED"
    assert env.parked() == []
    told = env.bike.tell("p:A")
    assert "waiting_for" not in told and told["event"] == "TML"
    finish(pool, job)
    assert env.claim(pool) is None and env.usage() == {}
    assert env.timeline() == {"p:A": NOW + 600}


def test_set_now_of_a_parked_job_keeps_its_place_in_line(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    env.bike.set("r:A", "NOW", needs="host:a")
    env.bike.set("p1:A", "NOW", needs="host:a")
    env.bike.set("p2:A", "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    assert env.bike.set("p1:A", "NOW", needs="host:a") == "PLACED"  # same needs (e.g. dispatch --schedules)
    assert [j for _, j in env.parked()] == ["p1:A", "p2:A"]
    finish(pool, job)
    assert env.claim(pool).lease.jobid == "p1:A"


def test_set_of_a_parked_job_with_other_needs_requeues_it(env: REnv) -> None:
    """Regression: it stayed parked on a resource it no longer needed."""
    env.bike.set_capacity("host:a", 0)
    pool = env.pool()
    env.bike.set("p:A", "NOW", needs="host:a")
    assert env.claim(pool) is None
    assert env.waiting_for("p:A") == "host:a"
    assert env.bike.set("p:A", "NOW", needs="host:b") == "PLACED"
    assert env.parked() == [] and "waiting_for" not in env.bike.tell("p:A")
    assert env.queue("A") == ["p:A"]
    job = env.claim(pool)
    assert job.lease.jobid == "p:A" and env.usage() == {"host:b": 1}


def test_unset_of_a_woken_job_passes_its_place_on(env: REnv) -> None:
    """Regression: a job woken (in the ready set) then unset took its wake-up
    with it: the next in line waited forever on a resource with room."""
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    for name in ("r:A", "p1:A", "p2:A"):
        env.bike.set(name, "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    finish(pool, job)
    assert env.ready() == ["p1:A"]
    assert env.waiting_for("p1:A").startswith("nothing")
    assert env.bike.unset("p1:A") == 1
    assert env.ready() == ["p2:A"] and env.usage() == {"host:a": 1}
    assert env.claim(pool).lease.jobid == "p2:A"


def test_set_of_a_woken_job_to_the_timeline_passes_its_place_on(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    pool = env.pool()
    for name in ("r:A", "p1:A", "p2:A"):
        env.bike.set(name, "NOW", needs="host:a")
    job = env.claim(pool)
    assert env.claim(pool) is None
    finish(pool, job)
    assert env.bike.set("p1:A", f"AT:{NOW + 60:.0f}", needs="host:a") == "PLACED"
    assert env.ready() == ["p2:A"]
    assert env.claim(pool).lease.jobid == "p2:A"


def test_a_waiting_job_is_not_starved_by_a_busy_queue(env: REnv) -> None:
    """Regression: a pool finishing a job of resource r claimed, in the same
    script, the next job of its own queue needing r, before the job woken for
    r (another queue, another pool) could: that job waited forever."""
    env.bike.set_capacity("r", 1)
    pool_a, pool_b = env.pool("A"), env.pool("B")
    rot_a, rot_b = Rotation(["A"]), Rotation(["B"])
    for i in range(3):
        env.bike.set(f"b{i}:B", "CONTINUE", needs="r")
    job_b = pool_b.claim(rot_b, "wb")
    env.bike.set("a:A", "NOW", needs="r")
    assert pool_a.claim(rot_a, "wa") is None  # parks
    started = [job_b.lease.jobid]
    for _ in range(3):
        _, job_b = pool_b.finish(job_b, Outcome("ok"), "", rot_b, "wb")
        if job_b is not None:
            started.append(job_b.lease.jobid)
        job_a = pool_a.claim(rot_a, "wa")
        if job_a is not None:
            started.append(job_a.lease.jobid)
            break
    assert started == ["b0:B", "a:A"]
    # the B jobs (b0 again, being CONTINUE) wait behind a, in order
    assert env.parked() == [("r", "b1:B"), ("r", "b2:B"), ("r", "b0:B")]


def test_no_busy_loop_when_woken_jobs_do_not_fit(env: REnv) -> None:
    """Regression: a job woken for one resource that lacked another woke the
    other's waiters, which lacked the first: the claim answered MORE forever."""
    env.bike.set_capacity("r1", 2)
    env.bike.set_capacity("r2", 2)
    pool = env.pool()
    env.bike.set("z1:A", "NOW", needs="r1")
    env.bike.set("z2:A", "NOW", needs="r2")
    z1, z2 = env.claim(pool), env.claim(pool)
    env.bike.set("x:A", "NOW", needs="r1=2,r2=1")
    env.bike.set("y:A", "NOW", needs="r1=1,r2=2")
    calls = count_scripts(pool)
    assert env.claim(pool) is None
    assert calls["claim"] == 1
    assert env.parked() == [("r1", "x:A"), ("r1", "y:A")]
    finish(pool, z1)
    assert env.ready() == ["x:A"]  # r1 has room for 2: x (2) wakes; y (1) stays behind it
    x = env.claim(pool)
    assert x.lease.jobid == "x:A"
    assert env.claim(pool) is None
    assert calls["claim"] == 3
    assert env.usage() == {"r1": 2, "r2": 2} and env.parked() == [("r1", "y:A")]
    finish(pool, z2)
    finish(pool, x)
    assert env.ready() == ["y:A"]
    assert env.claim(pool).lease.jobid == "y:A"
    assert env.parked() == [] and env.usage() == {"r1": 1, "r2": 2}


def test_local_resources_limit_what_one_pool_claims(env: REnv) -> None:
    pool = env.pool("A", resources={"cpu_cores": 4})
    env.bike.set("x:A", "NOW", needs="worker:cpu_cores=4")
    env.bike.set("y:A", "NOW", needs="worker:cpu_cores=4")
    env.bike.set("z:A", "NOW")
    x = env.claim(pool)
    assert x.lease.jobid == "x:A"
    assert pool.local_used == {"worker:cpu_cores": 4}
    assert env.usage() == {}  # local amounts are the pool's own business
    assert env.claim(pool) is None  # y does not fit here ...
    assert env.queue("A") == ["z:A", "y:A"]  # ... and stays first in its queue
    assert env.parked() == []
    # another pool with room (or none declared: unlimited) takes it
    other = env.pool("A")
    y = env.claim(other)
    assert y.lease.jobid == "y:A" and other.local_used == {}
    env.bike.set("y2:A", "NOW", needs="worker:cpu_cores=4")
    assert env.queue("A") == ["y2:A", "z:A"]
    assert env.claim(pool).lease.jobid == "z:A"  # no needs: fits
    assert env.claim(pool) is None
    finish(pool, x)
    assert pool.local_used == {"worker:cpu_cores": 0}
    assert env.claim(pool).lease.jobid == "y2:A"


def test_local_resources_with_a_woken_job_that_does_not_fit(env: REnv) -> None:
    env.bike.set_capacity("db:x", 1)
    small = env.pool("A", resources={"cpu_cores": 4})  # big enough, but one core is busy
    big = env.pool("A", resources={"cpu_cores": 8})
    env.bike.set("busy:A", "NOW", needs="worker:cpu_cores=1")
    env.bike.set("hold:A", "NOW", needs="db:x")
    env.bike.set("w:A", "NOW", needs="db:x,worker:cpu_cores=4")
    assert env.claim(small).lease.jobid == "busy:A"
    hold = env.claim(small)
    assert env.claim(small) is None and env.parked() == [("db:x", "w:A")]
    finish(small, hold)
    assert env.ready() == ["w:A"]
    assert env.claim(small) is None  # woken, but 4 cores are not free here: it stays woken
    assert env.ready() == ["w:A"] and env.usage() == {"db:x": 1}
    job = env.claim(big)
    assert job.lease.jobid == "w:A" and big.local_used == {"worker:cpu_cores": 4}
    assert env.usage() == {"db:x": 1}


def test_needs_hook_is_merged_with_explicit_needs(c: redis.Redis, prefix: str) -> None:
    class Hooked(Worker):
        def needs(self, jobid: str) -> dict[str, int] | None:
            return {"host:" + jobid.split(":")[0]: 1, "db:x": 1}

    bike = Redbike(Hooked("A"), prefix=prefix, client=c)
    bike.set("h1:A", "NOW")
    bike.set("h2:A", "NOW", needs="db:x=2,cpu:y")
    bike.set("h3:A", "NOW", needs={"worker:cpu_cores": 2})
    needs = {jobid: decode_job(value).needs for jobid, value in c.hgetall(bike.keys.jobs).items()}
    assert needs == {
        "h1:A": "db:x=1,host:h1=1",
        "h2:A": "cpu:y=1,db:x=2,host:h2=1",  # explicit wins per resource
        "h3:A": "db:x=1,host:h3=1,worker:cpu_cores=2",
    }
    assert bike.tell("h2:A")["needs"] == "cpu:y=1,db:x=2,host:h2=1"
    with pytest.raises(ResourceError):
        bike.set("h4:A", "NOW", needs="db:x=0")
    with pytest.raises(ResourceError):
        bike.set("h4:A", "NOW", needs="bad|name")
    assert bike.tell("h4:A") is None


def test_schedules_csv_third_column_is_needs(env: REnv, tmp_path: Path) -> None:
    path = tmp_path / "jobs.csv"
    path.write_text('a:A,NOW,"host:a,db:x=2"\nb:A,NOW\nc:A,NOW,db:bad=x\n')
    rows = read_schedules_csv(str(path))
    assert rows == [("a:A", "NOW", "host:a,db:x=2", "", "", ""), ("b:A", "NOW", "", "", "", ""),
                    ("c:A", "NOW", "db:bad=x", "", "", "")]
    errors = env.bike.set_many(rows)
    assert len(errors) == 1 and errors[0].startswith("c:A: ")
    assert {jobid: decode_job(value).needs for jobid, value in env.c.hgetall(env.keys.jobs).items()} \
        == {"a:A": "db:x=2,host:a=1", "b:A": ""}
    assert env.schedule("c:A") is None


def test_load_capacities_csv(env: REnv, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("host:a,2\n\ndb:x, 0\nhost:b,none\n")
    assert env.bike.load_capacities(str(good)) == 3
    assert env.c.hgetall(env.keys.capacities) == {"host:a": "2", "db:x": "0"}
    malformed = [("host:c,1\nhost:d,-1\n", 2), ("host:c,1\nhost:d,1\nhost e,1\n", 3), ("host:c,1\nhost:d,1,2\n", 2)]
    for text, line in malformed:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises((ResourceError, CsvError)) as caught:
            env.bike.load_capacities(str(bad))
        assert f"{bad}:{line}:" in str(caught.value)
        assert env.c.hgetall(env.keys.capacities) == {"host:a": "2", "db:x": "0"}  # nothing set
    assert env.bike.set_capacity("host:a", None) == 0
    assert env.c.hgetall(env.keys.capacities) == {"db:x": "0"}
    with pytest.raises(ResourceError):
        env.bike.set_capacity("host:a", -1)


def test_capacities_report(env: REnv) -> None:
    env.bike.set_capacity("host:a", 1)
    env.bike.set_capacity("db:x", 0)
    env.bike.set_capacity("cpu:z", 5)
    pool = env.pool()
    env.bike.set("r:A", "NOW", needs="host:a,free:q=3")
    env.bike.set("w1:A", "NOW", needs="host:a")
    env.bike.set("w2:B", "NOW", needs="db:x")
    env.claim(pool)
    assert env.claim(pool) is None
    assert list(env.bike.capacities()) == [
        ("cpu:z", 5, 0, 0),
        ("db:x", 0, 0, 1),
        ("free:q", None, 3, 0),  # unlimited, but in use
        ("host:a", 1, 1, 1),
    ]


def test_cli_capacity_capacities_set_needs_and_tell(real: REnv, redis_server, tmp_path: Path, capsys) -> None:
    conf = tmp_path / "redbike.conf"
    conf.write_text(f"[redbike]\nprefix = {real.keys.prefix}\n\n[redbike-redis]\nurl = {redis_server.url}\n")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--config", str(conf), *args])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("capacity", "host:a", "1")[0] == 0
    assert run("capacity", "db:x", "none")[0] == 0
    capfile = tmp_path / "caps.csv"
    capfile.write_text("db:y,2\nhost:b,0\n")
    assert run("capacity", "--load", str(capfile))[0] == 0
    assert run("set", "j1:A", "NOW", "--needs=host:a,db:y=2")[0] == 0
    assert run("set", "j2:A", "NOW", "--needs=host:a")[0] == 0
    assert real.claim(real.pool("A")).lease.jobid == "j1:A"
    assert real.claim(real.pool("A")) is None
    code, out, _ = run("capacities")
    assert code == 0
    assert list(csv.reader(io.StringIO(out))) == [
        ["db:y", "2", "2", "0"], ["host:a", "1", "1", "1"], ["host:b", "0", "0", "0"],
    ]
    told = json.loads(run("tell", "j2:A")[1])
    assert told["needs"] == "host:a=1" and told["waiting_for"] == "host:a"
    assert json.loads(run("tell", "j1:A")[1])["lease"]["holds"] == "db:y=2,host:a=1"
    code, _, err = run("capacity", "host:a", "-3")
    assert code == 2 and err.startswith("redbike:") and "Traceback" not in err
    code, _, err = run("set", "j3:A", "NOW", "--needs=host:a=x")
    assert code == 2 and err.count("\n") == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("host:c,1\nhost:d,lots\n")
    code, _, err = run("capacity", "--load", str(bad))
    assert code == 2 and f"{bad}:2:" in err
    assert real.c.hget(real.keys.capacities, "host:c") is None



# =============================================== 3. real processes, real server

RESWORKER = """
import json, os, time
import redis
from redbike import RoundRobin


class ResWorker(RoundRobin):
    \"\"\"s<MS>-...: sleeps MS milliseconds; once-...: hangs on its first run only.
    Records start and end (job, pid, token, at) on TESTLOG_KEY.\"\"\"

    def timeout(self, queue_name):
        return 2 if queue_name == "T" else None

    def work(self, jobid):
        log = redis.Redis.from_url(os.environ["TESTLOG_URL"])
        key = os.environ["TESTLOG_KEY"]
        record = dict(job=jobid, pid=os.getpid(), token=self.lease.token)
        log.rpush(key, json.dumps(dict(record, event="start", at=time.time())))
        if jobid.startswith("once-") and log.setnx(key + ":" + jobid, 1):
            time.sleep(3600)
        if jobid.startswith("s"):
            time.sleep(int(jobid[1:].split("-", 1)[0]) / 1000)
        log.rpush(key, json.dumps(dict(record, event="end", at=time.time())))
"""


class Procs(Daemons):
    """redbike subprocesses of one test, all started in its folder."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        super().__init__(cwd, env)
        self.cwd = cwd

    def start(self, *args: str) -> subprocess.Popen:  # type: ignore[override]
        return super().start(*args, cwd=self.cwd)

    def cli(self, *args: str) -> str:
        result = subprocess.run(redbike_command(*args), check=False, cwd=self.cwd, env=self.env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def procs(workdir: Path, redis_server, prefix: str):
    (workdir / "resworker.py").write_text(RESWORKER)
    env = dict(os.environ, TESTLOG_URL=redis_server.url, TESTLOG_KEY=f"{prefix}:testlog", PYTHONUNBUFFERED="1")
    started = Procs(workdir, env)
    try:
        yield started
    finally:
        started.cleanup()


def test_real_workers_respect_capacities_and_release_after_a_kill(procs: Procs, client: redis.Redis,
                                                                  prefix: str) -> None:
    keys = Keys(prefix)
    testlog = f"{prefix}:testlog"
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    caps = {"host:a": 2, "host:b": 1, "db:x": 1, "db:y": 1}
    for resource, capacity in caps.items():
        bike.set_capacity(resource, capacity)
    worker_spec = "resworker:ResWorker('A:B:T')"
    dispatcher = procs.start("dispatch")
    pools = [procs.start("work", worker_spec, "--concurrency", "2") for _ in range(2)]
    wait_for(lambda: client.get(keys.dispatcher), what="the dispatcher to lead")
    wait_for(lambda: client.pubsub_numsub(keys.queue_channel("T"))[0][1] >= 2, what="the pools to listen")

    def recs() -> list[dict[str, Any]]:
        return [json.loads(r) for r in client.lrange(testlog, 0, -1)]

    # A job holding db:y hangs; its whole pool is killed (kill -9) mid-job.
    bike.set("once-kill:T", "NOW", needs="db:y")
    first = wait_for(lambda: [r for r in recs() if r["job"] == "once-kill:T"], what="once-kill to start")[0]
    victim = next(p for p in pools if p.pid == worker_of(first["pid"]))
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(5)
    pools.remove(victim)
    pools.append(procs.start("work", worker_spec, "--concurrency", "2"))

    needs_by_kind = ["host:a", "host:a", "host:b", "host:a,db:x", "host:b,db:x", "db:x"]
    jobs: dict[str, dict[str, int]] = {}
    for i in range(60):
        jobid = f"s{50 + (i * 17) % 51}-{i}:{'AB'[i % 2]}"
        jobs[jobid] = dict.fromkeys(needs_by_kind[i % 6].split(","), 1)
    for i in range(3):  # these wait for db:y: until the dispatcher reaps the killed run
        jobs[f"s20-y{i}:A"] = {"db:y": 1}
    for jobid, needs in jobs.items():
        bike.set(jobid, "NOW", needs=needs)

    def all_done() -> bool:
        ended = Counter(r["job"] for r in recs() if r["event"] == "end")
        return all(ended[j] for j in jobs) and ended["once-kill:T"] >= 1

    wait_for(all_done, timeout=40, what="every job to run")
    records = recs()
    starts = Counter(r["job"] for r in records if r["event"] == "start")
    assert all(starts[j] == 1 for j in jobs), {j: starts[j] for j in jobs if starts[j] != 1}
    assert starts["once-kill:T"] == 2
    reaped_at = bike.tell("once-kill:T")["last_error"]["at"]
    assert bike.tell("once-kill:T")["last_error"]["status"] == "EXP"

    # Sweep the runs: never more of a resource in use than its capacity.
    runs: dict[str, dict[str, Any]] = {}
    for r in records:
        runs.setdefault(r["token"], {"job": r["job"], "end": reaped_at})[r["event"]] = r["at"]
    jobs["once-kill:T"] = {"db:y": 1}
    events = []
    for run in runs.values():
        for resource, amount in jobs[run["job"]].items():
            events += [(run["start"], 1, resource, amount), (run["end"], 0, resource, -amount)]
    in_use: Counter = Counter()
    peak: Counter = Counter()
    b_started_while_a_full = 0
    for at, is_start, resource, amount in sorted(events):
        in_use[resource] += amount
        peak[resource] = max(peak[resource], in_use[resource])
        assert in_use[resource] <= caps[resource], f"{resource}: {in_use[resource]} in use at {at}"
        if is_start and resource == "host:b" and in_use["host:a"] == caps["host:a"]:
            b_started_while_a_full += 1
    assert peak == caps  # every capacity was reached: the jobs did compete
    assert b_started_while_a_full >= 1, "host:b jobs waited while host:a was saturated"
    # The db:y jobs waited for the reap of the killed run's lease.
    assert min(run["start"] for run in runs.values() if run["job"].startswith("s20-y")) >= reaped_at

    report = list(csv.reader(io.StringIO(procs.cli("capacities"))))
    assert report == [[r, str(caps[r]), "0", "0"] for r in sorted(caps)]
    procs.cli("control", "HALT")
    for process in [dispatcher, *pools]:
        assert process.wait(10) == 0


def test_one_pools_children_share_its_local_resources(procs: Procs, client: redis.Redis, prefix: str) -> None:
    """Four children of one pool, three cpus: the runs' worker-local amounts
    never add up to more than three, across processes, including a run the
    supervisor kills for overrunning its timeout (what it held comes back)."""
    keys = Keys(prefix)
    testlog = f"{prefix}:testlog"
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    dispatcher = procs.start("dispatch")
    pool = procs.start("work", "resworker:ResWorker('A:T')", "--concurrency", "4", "--resources", "cpu=3")
    wait_for(lambda: client.pubsub_numsub(keys.queue_channel("A"))[0][1] >= 1, what="the pool to listen")
    jobs = {f"s{80 + (i * 37) % 120}-{i}:A": 1 + i % 2 for i in range(30)}
    jobs["once-cpu:T"] = 2  # hangs on its first run: killed after its 2 s timeout
    bike.set("once-cpu:T", "NOW", needs="worker:cpu=2")
    for jobid, cpus in jobs.items():
        if jobid != "once-cpu:T":
            bike.set(jobid, "NOW", needs=f"worker:cpu={cpus}")

    def recs() -> list[dict[str, Any]]:
        return [json.loads(r) for r in client.lrange(testlog, 0, -1)]

    def all_done() -> bool:
        ended = Counter(r["job"] for r in recs() if r["event"] == "end")
        return all(ended[j] for j in jobs)

    wait_for(all_done, timeout=40, what="every job to run")
    killed = bike.tell("once-cpu:T")["last_error"]
    assert killed["status"] == "EXP" and killed["error"] == "killed: timed out after 2s"
    runs: dict[str, dict[str, Any]] = {}
    for r in recs():
        runs.setdefault(r["token"], {"job": r["job"], "end": killed["at"], "pid": r["pid"]})[r["event"]] = r["at"]
    assert len({run["pid"] for run in runs.values()}) >= 3  # the children took part
    events = sorted(event for run in runs.values() for event in
                    ((run["start"], 1, jobs[run["job"]]), (run["end"], 0, -jobs[run["job"]])))
    in_use = peak = 0
    for at, _, amount in events:
        in_use += amount
        peak = max(peak, in_use)
        assert in_use <= 3, f"{in_use} cpus in use at {at}"
    assert peak == 3  # the jobs did compete for them
    procs.cli("control", "HALT")
    assert pool.wait(10) == 0 and dispatcher.wait(10) == 0


def test_freed_local_resources_wake_the_pools_idle_children(procs: Procs, client: redis.Redis,
                                                             prefix: str) -> None:
    """A child that gives back worker-local amounts wakes its idle siblings
    (no pub/sub message says so): here the idle child takes a job that
    waited behind one needing the cpus, at once, not at its 6 s look."""
    keys = Keys(prefix)
    testlog = f"{prefix}:testlog"
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    pool = procs.start("work", "resworker:ResWorker('A')", "--concurrency", "2", "--resources", "cpu=2")
    wait_for(lambda: client.pubsub_numsub(keys.queue_channel("A"))[0][1] >= 1, what="the pool to listen")

    def recs(event: str, job: str) -> list[dict[str, Any]]:
        found = map(json.loads, client.lrange(testlog, 0, -1))
        return [r for r in found if r["event"] == event and r["job"] == job]

    def claims() -> int:
        return script_calls(client)

    bike.set("s1000-first:A", "NOW", needs="worker:cpu=2")
    wait_for(lambda: recs("start", "s1000-first:A"), what="the first job to start")
    before = claims()
    bike.set("s1500-second:A", "NOW", needs="worker:cpu=2")  # wakes the idle child: it does not fit
    wait_for(lambda: claims() >= before + 2, what="the idle child to look and give up")
    assert client.lrange(keys.queue("A"), 0, -1) == ["s1500-second:A"]
    bike.set("s0-third:A", "NOW")  # behind it in the queue: no wake-up for it
    first_end = wait_for(lambda: recs("end", "s1000-first:A"), what="the first job to end")[0]
    # The first job's child takes the second in its fused claim; the third
    # goes to the idle child, woken by the cpus freed.
    third = wait_for(lambda: recs("start", "s0-third:A"), timeout=10, what="the third job to start")[0]
    assert third["at"] - first_end["at"] < 1.0, third["at"] - first_end["at"]
    # The first child writes the second's start after its claim returns: the
    # third, claimed by the woken sibling, may be logged before it.
    second = wait_for(lambda: recs("start", "s1500-second:A"), what="the second job to start")[0]
    assert second["pid"] == first_end["pid"] != third["pid"]
    procs.cli("control", "HALT")
    assert pool.wait(10) == 0


def test_a_freed_resource_wakes_an_idle_pool_at_once(procs: Procs, client: redis.Redis, prefix: str) -> None:
    """The waiting job's pool is idle (it parked the job); the resource frees
    in another pool: pub/sub wakes it, well before its 6 s look at its queues."""
    keys = Keys(prefix)
    testlog = f"{prefix}:testlog"
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    bike.set_capacity("host:c", 1)
    holder_pool = procs.start("work", "resworker:ResWorker('A')")
    waiter_pool = procs.start("work", "resworker:ResWorker('B')")
    wait_for(lambda: client.pubsub_numsub(keys.queue_channel("B"))[0][1] >= 1, what="the pools to listen")
    wait_for(lambda: client.pubsub_numsub(keys.queue_channel("A"))[0][1] >= 1, what="the pools to listen")

    def recs(event: str, job: str) -> list[dict[str, Any]]:
        found = map(json.loads, client.lrange(testlog, 0, -1))
        return [r for r in found if r["event"] == event and r["job"] == job]

    bike.set("s1000-hold:A", "NOW", needs="host:c")
    wait_for(lambda: recs("start", "s1000-hold:A"), what="the holder to start")
    bike.set("s0-wait:B", "NOW", needs="host:c")
    wait_for(lambda: (bike.tell("s0-wait:B") or {}).get("waiting_for") == "host:c", what="the waiter to park")
    assert recs("end", "s1000-hold:A") == []  # parked while the holder still ran
    started = wait_for(lambda: recs("start", "s0-wait:B"), timeout=10, what="the waiter to start")[0]
    ended = recs("end", "s1000-hold:A")[0]
    assert 0 <= started["at"] - ended["at"] < 0.5, started["at"] - ended["at"]
    procs.cli("control", "HALT")
    assert holder_pool.wait(10) == 0 and waiter_pool.wait(10) == 0


# ======================================================= 2. property-based

RESOURCES = ["r1", "r2", "r3"]
JOBS = [f"j{i}:{'AB'[i % 2]}" for i in range(8)]


class ResourceMachine(RuleBasedStateMachine):
    """Random sets, unsets, claims, finishes, crashes and capacity changes
    against a model of the counters; see the invariants."""

    @initialize()
    def start(self) -> None:
        self.c = fakeredis.FakeRedis(server=fakeredis.FakeServer(), decode_responses=True)
        self.env = REnv(self.c, "prop")
        self.pools = {
            "AB": self.env.pool("A:B"),
            "A-cpu2": self.env.pool("A", resources={"cpu": 2}),
            "B-cpu3": self.env.pool("B", resources={"cpu": 3}),
        }
        self.rotations = {name: Rotation(pool.queue_names) for name, pool in self.pools.items()}
        self.calls = {name: count_scripts(pool) for name, pool in self.pools.items()}
        self.dispatcher = self.env.dispatcher()
        self.running: list[tuple[str, Any]] = []  # (pool name, Running)
        self.caps: dict[str, int | None] = dict.fromkeys(RESOURCES)
        # resources whose capacity was lowered below what running jobs hold,
        # or below that plus what is set aside for woken jobs
        self.held_over: set[str] = set()
        self.usage_over: set[str] = set()
        self.before: tuple[Counter, dict[str, int]] = (Counter(), {})
        self.owed: set[str] = set()  # jobs set to run, not yet claimed since

    # -- rules --------------------------------------------------------------

    @rule(
        job=st.sampled_from(JOBS),
        schedule=st.sampled_from(["NOW", "CONTINUE", "LATER", "STOP"]),
        needs=st.dictionaries(st.sampled_from(RESOURCES + ["worker:cpu"]), st.integers(1, 3), max_size=3),
    )
    def set_job(self, job: str, schedule: str, needs: dict[str, int]) -> None:
        if schedule == "LATER":
            schedule = f"AT:{self.env.clock.now + 30:.0f}"
        self.env.bike.set(job, schedule, needs=needs)
        if schedule == "STOP":
            self.owed.discard(job)
        else:
            self.owed.add(job)

    @rule(job=st.sampled_from(JOBS))
    def unset_job(self, job: str) -> None:
        self.env.bike.unset(job)
        self.owed.discard(job)

    def _claimed(self, name: str, job: Any) -> None:
        if job is not None:
            self.running.append((name, job))
            self.owed.discard(job.lease.jobid)

    @rule(name=st.sampled_from(["AB", "A-cpu2", "B-cpu3"]))
    def claim(self, name: str) -> None:
        before = self.calls[name]["claim"]
        job = self.pools[name].claim(self.rotations[name], f"w-{name}")
        assert self.calls[name]["claim"] - before == 1  # 8 jobs: never MORE, never a loop
        self._claimed(name, job)

    @precondition(lambda self: self.running)
    @rule(
        pick=st.integers(0, 100),
        outcome=st.sampled_from(["ok", "ok", "error", "stop", "unset", "expired"]),
        fused=st.booleans(),
        later=st.floats(0, 5),
    )
    def finish(self, pick: int, outcome: str, fused: bool, later: float) -> None:
        name, job = self.running.pop(pick % len(self.running))
        self.env.clock.now += later
        pool = self.pools[name]
        done, nxt = pool.finish(job, Outcome(outcome, error="E" if outcome in ("error", "expired") else ""), "",
                                self.rotations[name] if fused else None, f"w-{name}")
        assert done in ("DONE", "GONE")
        self._claimed(name, nxt)

    def _drop_lost_leases(self) -> None:
        """Runs whose lease was reaped: their worker finishes late (STALE)."""
        leases = self.c.hgetall(self.env.keys.leases)
        for name, job in list(self.running):
            lease = leases.get(job.lease.jobid)
            if lease is None or not lease.startswith(job.lease.token + "|"):
                self.running.remove((name, job))
                done, _ = self.pools[name].finish(job, Outcome("ok"), "", None, f"w-{name}")
                assert done == "STALE"

    @precondition(lambda self: self.running)
    @rule(pick=st.integers(0, 100))
    def crash(self, pick: int) -> None:
        """A worker dies: its lease runs out and the dispatcher reaps it."""
        _, job = self.running[pick % len(self.running)]
        deadline = self.c.zscore(self.env.keys.deadlines, job.lease.jobid)
        self.env.clock.now = max(self.env.clock.now, deadline)
        assert self.dispatcher.lead(self.env.clock.now)
        assert self.dispatcher.reap(self.env.clock.now) >= 1
        self._drop_lost_leases()

    @rule(seconds=st.sampled_from([0, 1, 31]))
    def dispatch(self, seconds: float) -> None:
        self.env.clock.now += seconds
        assert self.dispatcher.lead(self.env.clock.now)
        self.dispatcher.move_due(self.env.clock.now)
        self.dispatcher.reap(self.env.clock.now)
        self._drop_lost_leases()

    @rule(resource=st.sampled_from(RESOURCES), capacity=st.sampled_from([0, 1, 2, 3, 4, None]))
    def set_capacity(self, resource: str, capacity: int | None) -> None:
        held, in_use = self._held()[resource], int(self.c.hget(self.env.keys.usage, resource) or 0)
        self.env.bike.set_capacity(resource, capacity)
        self.caps[resource] = capacity
        for over, amount in ((self.held_over, held), (self.usage_over, in_use)):
            if capacity is not None and capacity < amount:
                over.add(resource)
            else:
                over.discard(resource)

    # -- invariants ---------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        k = self.env.keys
        return {
            "usage": {r: int(v) for r, v in self.c.hgetall(k.usage).items()},
            "leases": self.c.hgetall(k.leases),
            "needs": {jobid: decode_job(value).needs for jobid, value in self.c.hgetall(k.jobs).items()
                      if decode_job(value).needs},
            "parked": self.c.zrange(k.parked, 0, -1),
            "ready": self.c.zrange(k.ready, 0, -1),
            "parking": self.c.hgetall(k.parking),
            "aside": self.c.zrange(k.aside, 0, -1),
            "statuses": self.c.hgetall(k.statuses),
            "caps": self.c.hgetall(k.capacities),
            "lists": {q: self.c.lrange(k.queue(q), 0, -1) for q in "AB"},
            "timeline": self.c.zrange(k.timeline, 0, -1),
        }

    def _held(self, leases: dict[str, str] | None = None) -> Counter:
        """What running jobs hold of each global resource, from their leases."""
        held: Counter = Counter()
        for lease in (self.c.hgetall(self.env.keys.leases) if leases is None else leases).values():
            for name, amount in self._amounts(lease.rsplit("|", 1)[1]).items():
                if not name.startswith("worker:"):
                    held[name] += amount
        return held

    @staticmethod
    def _amounts(text: str | None) -> dict[str, int]:
        return {n: int(a) for n, a in (p.split("=") for p in (text or "").split(",") if p)}

    @invariant()
    def counters_match_leases_and_set_asides(self) -> None:
        if not hasattr(self, "env"):
            return
        s = self._state()
        assert s["caps"] == {r: str(cap) for r, cap in self.caps.items() if cap is not None}
        held = self._held(s["leases"])
        set_aside: Counter = Counter()
        for jobid, value in s["parking"].items():
            if value.startswith("R"):
                reservation, ready = value[1:].split("|", 1)
                resource, amount = reservation.split("=")
                assert ready in s["ready"], (jobid, value)
                assert self._amounts(s["needs"].get(jobid)).get(resource) == int(amount)
                set_aside[resource] += int(amount)
            elif value.startswith("A"):
                assert value.split("|", 1)[1] in s["aside"], (jobid, value)
            else:
                assert value.startswith("P") and value[1:] in s["parked"], (jobid, value)
        assert len(s["parking"]) == len(s["parked"]) + len(s["ready"]) + len(s["aside"])
        expected = {r: n for r, n in (held + set_aside).items() if n}
        assert s["usage"] == expected, (s["usage"], dict(held), dict(set_aside))
        held_before, usage_before = self.before
        for resource in RESOURCES:
            cap = self.caps[resource]
            checks = ((self.held_over, held, held_before), (self.usage_over, s["usage"], usage_before))
            for over, now, before in checks:
                amount = now.get(resource, 0)
                if resource in over:
                    # lowered below it: nothing more is admitted (or set aside) until it is below
                    assert amount <= before.get(resource, 0), (resource, amount, before)
                    if cap is None or amount <= cap:
                        over.discard(resource)
                elif cap is not None:
                    assert amount <= cap, (resource, amount, cap, s["usage"], dict(held))
        self.before = (held, s["usage"])

    @invariant()
    def waiting_jobs_lack_room(self) -> None:
        """The first job in line for each resource does not fit (so every job
        in line waits for a reason); a woken job has its amount set aside."""
        if not hasattr(self, "env"):
            return
        s = self._state()
        lines: dict[str, list[str]] = defaultdict(list)
        for member in s["parked"]:
            resource, _seq, queue, jobid = member.split("|", 3)
            lines[resource].append(jobid)
            assert s["parking"].get(jobid) == "P" + member
            assert self._amounts(s["needs"].get(jobid)).get(resource, 0) > 0
            assert queue == jobid.rsplit(":", 1)[1]
        for resource, jobids in lines.items():
            cap = self.caps[resource]
            assert cap is not None, f"{resource} is unlimited but {jobids} wait for it"
            need = self._amounts(s["needs"][jobids[0]])[resource]
            assert s["usage"].get(resource, 0) + need > cap, (resource, jobids, s["usage"], cap)
            assert cap == 0 or need <= cap, f"{jobids[0]} can never fit {resource} but holds its line"
        for member in s["aside"]:
            resource, amount, _seq, queue, jobid = member.split("|", 4)
            seen = int(s["parking"][jobid][1:].split("|", 1)[0])
            assert self._amounts(s["needs"].get(jobid)).get(resource) == int(amount) > seen
            assert queue == jobid.rsplit(":", 1)[1]
            if resource.startswith("worker:"):  # more than a pool of its queue has
                assert seen in {pool.claims.local_capacity.get(resource) for pool in self.pools.values()}
            else:  # more than the capacity now (0 pauses: it waits aside until there is enough)
                cap = self.caps[resource]
                assert cap is not None and int(amount) > cap, (member, cap)

    @invariant()
    def every_job_is_in_one_place(self) -> None:
        if not hasattr(self, "env"):
            return
        s = self._state()
        places: Counter = Counter()
        for q in "AB":
            places.update(s["lists"][q])
        places.update(m.split("|", 3)[3] for m in s["parked"])
        places.update(m.split("|", 2)[2] for m in s["ready"])
        places.update(m.split("|", 4)[4] for m in s["aside"])
        places.update(list(s["leases"]))
        places.update(s["timeline"])
        assert all(n == 1 for n in places.values()), places
        for jobid in places:
            if jobid not in s["leases"] and jobid not in s["timeline"]:
                assert s["statuses"][jobid].startswith("ENQ:")
        assert sorted(s["leases"]) == sorted(job.lease.jobid for _, job in self.running)

    @invariant()
    def pools_count_their_local_amounts(self) -> None:
        if not hasattr(self, "env"):
            return
        for name, pool in self.pools.items():
            mine = Counter()
            for owner, job in self.running:
                if owner == name:
                    mine.update(job.local_needs)
            for resource, capacity in pool.claims.local_capacity.items():
                assert pool.local_used[resource] == mine[resource] <= capacity

    def teardown(self) -> None:
        """Liveness: with every run finished and every capacity raised, each
        job set to run does run."""
        if not hasattr(self, "env"):
            return
        for name, job in self.running:
            assert self.pools[name].finish(job, Outcome("ok"), "", None, f"w-{name}")[0] in ("DONE", "GONE")
        self.running = []
        for resource in RESOURCES:
            self.env.bike.set_capacity(resource, 10 if resource != "r3" else None)
        pool, rotation = self.pools["AB"], self.rotations["AB"]
        for _ in range(20):
            self.env.clock.now += 100
            assert self.dispatcher.lead(self.env.clock.now)
            self.dispatcher.move_due(self.env.clock.now)
            claimed = 0
            while (job := pool.claim(rotation, "w-AB")) is not None:
                claimed += 1
                self.owed.discard(job.lease.jobid)
                assert pool.finish(job, Outcome("stop"), "", None, "w-AB")[0] in ("DONE", "GONE")
            if not claimed and not self.c.zcard(self.env.keys.timeline):
                break
        assert self.owed == set(), f"never ran: {self.owed}"
        assert self.c.zcard(self.env.keys.parked) == self.c.zcard(self.env.keys.ready) == 0
        assert self.c.zcard(self.env.keys.aside) == 0
        assert self.c.hgetall(self.env.keys.usage) == {}


TestResourceMachine = ResourceMachine.TestCase
TestResourceMachine.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
