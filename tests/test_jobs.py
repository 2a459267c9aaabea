"""The job-state logic: the real Lua scripts, driven without worker processes.

Every test calls Redbike / WorkerPool / Dispatcher methods directly with an
injected clock and asserts the exact Redis state. The main ones run against
both fakeredis (with lupa) and the real redis-server; the real one is
authoritative.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import redis
from conftest import wait_for
from pooltools import ClaimingPool

from redbike import Redbike, RoundRobin, ScheduleError
from redbike.api import JobIdError, read_schedules_csv
from redbike.claims import GRACE_SECONDS, LEASE_SECONDS, Rotation
from redbike.cli import main
from redbike.csvfile import CsvError
from redbike.dispatcher import RENEW_SECONDS, STANDBY_SECONDS, Dispatcher
from redbike.events import Subscriber
from redbike.jobinput import SET_CHUNK
from redbike.occurrences import Retry
from redbike.records import JobRecord, decode_job, decode_placement, trail_of
from redbike.roundrobin import Lease
from redbike.schedules import parse_schedule
from redbike.scripts import subscribe
from redbike.states import (
    ENQ,
    FORGET,
    QUEUE,
    STOPPED,
    Outcome,
    Placement,
    parse_status,
    place_after_run,
    place_on_set,
)
from redbike.timefile import read_timefile, write_timefile

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HOURLY = "DTSTART:20231114T000000Z RRULE:FREQ=HOURLY"  # on the hour, UTC
NEXT_HOUR = 1_700_002_800.0  # 23:00:00Z, the first HOURLY occurrence after NOW
HOUR = 3600.0
CRON15 = "*/15 * * * *"
NO_JITTER = Retry(jitter=lambda: 0.0)  # a retry or a run that did not complete is placed at once
NEXT_15 = 1_700_000_100.0  # 22:15:00Z


class Clock:
    """A settable clock for the `clock=` parameters."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Worker(RoundRobin):
    """Queue S times out after 3s, L after 60s; the others use the default (10s)."""

    def timeout(self, queue_name: str) -> float | None:
        return {"S": 3, "L": 60}.get(queue_name)


class Env:
    """One redbike installation on a client, with helpers to read its state."""

    def __init__(self, c: redis.Redis, prefix: str, queues: str = "A:B") -> None:
        self.c = c
        self.clock = Clock(NOW)
        self.worker = Worker(queues)
        self.bike = Redbike(self.worker, prefix=prefix, client=c, clock=self.clock, retry=NO_JITTER)
        self.keys = self.bike.keys

    def at(self, when: float) -> Env:
        self.clock.now = when
        return self

    def pool(self, queues: str | None = None, **kwargs) -> ClaimingPool:
        worker = Worker(queues) if queues else self.worker
        pool = ClaimingPool(self.c, self.keys, worker, clock=self.clock, **{"retry": NO_JITTER, **kwargs})
        pool.control_seen = self.c.get(self.keys.control) or ""  # as run() does
        return pool

    def dispatcher(self, **kwargs) -> Dispatcher:
        return Dispatcher(self.c, self.keys, self.worker.queue_for, clock=self.clock, **{"retry": NO_JITTER, **kwargs})

    def claim(self, pool: ClaimingPool | None = None, worker_id: str = "w1"):
        pool = pool or self.pool()
        return pool.claim(Rotation(pool.queue_names), worker_id)

    # -- reading state --
    def queue(self, name: str) -> list[str]:
        return self.c.lrange(self.keys.queue(name), 0, -1)

    def status(self, jobid: str) -> str | None:
        return self.c.hget(self.keys.statuses, jobid)

    def schedule(self, jobid: str) -> str | None:
        return self.c.hget(self.keys.schedules, jobid)

    def timeline(self) -> dict[str, float]:
        return dict(self.c.zrange(self.keys.timeline, 0, -1, withscores=True))

    def leases(self) -> dict[str, str]:
        return self.c.hgetall(self.keys.leases)

    def deadlines(self) -> dict[str, float]:
        return dict(self.c.zrange(self.keys.deadlines, 0, -1, withscores=True))

    def pending(self) -> dict[str, str]:
        """The placements set while jobs ran (the pending field of their
        records), each as its 7 values joined by '|'."""
        return {jobid: "|".join(decode_placement(decode_job(value).pending))
                for jobid, value in self.c.hgetall(self.keys.jobs).items() if decode_job(value).pending}

    def errors(self) -> dict[str, dict]:
        return {k: json.loads(v) for k, v in self.c.hgetall(self.keys.errors).items()}

    def snapshot(self, *queues: str) -> dict:
        return {
            "schedules": self.c.hgetall(self.keys.schedules),
            "statuses": self.c.hgetall(self.keys.statuses),
            "timeline": self.timeline(),
            "leases": self.leases(),
            "deadlines": self.deadlines(),
            "pending": self.pending(),
            "errors": self.c.hgetall(self.keys.errors),
            "queues": {q: self.queue(q) for q in queues},
        }

    def assert_no_trace(self, jobid: str, *queues: str) -> None:
        snap = self.snapshot(*queues)
        for name, value in snap.items():
            if name == "queues":
                for q, items in value.items():
                    assert jobid not in items, f"{jobid} still in queue {q}"
            else:
                assert jobid not in value, f"{jobid} still in {name}: {value}"


@pytest.fixture
def env(c: redis.Redis, prefix: str) -> Env:
    return Env(c, prefix)


@pytest.fixture
def real(client: redis.Redis, prefix: str) -> Env:
    """The real server only."""
    return Env(client, prefix)


def stamp(event: str, when: float) -> str:
    return f"{event}:{int(when)}"


# ============================================================ 1. set

def test_set_now_and_continue_enqueue(env: Env) -> None:
    assert env.bike.set("a:A", "NOW") == "PLACED"
    assert env.bike.set("b:A", "CONTINUE") == "PLACED"
    assert env.bike.set("c:B", "now") == "PLACED"
    assert env.queue("A") == ["b:A", "a:A"]  # LPUSH in, RPOP out: a is next
    assert env.queue("B") == ["c:B"]
    assert env.c.hgetall(env.keys.statuses) == {j: stamp("ENQ", NOW) for j in ("a:A", "b:A", "c:B")}
    assert env.c.hgetall(env.keys.schedules) == {"a:A": "NOW", "b:A": "CONTINUE", "c:B": "now"}  # as given
    assert env.timeline() == {}


def test_set_at_in_the_future_goes_to_the_timeline(env: Env) -> None:
    assert env.bike.set("a:A", f"AT:{NOW + 30:.0f}") == "PLACED"
    assert env.bike.set("b:A", "AT:2023-11-14T22:14:00Z") == "PLACED"
    assert env.timeline() == {"a:A": NOW + 30, "b:A": NOW + 40}
    assert env.status("a:A") == env.status("b:A") == stamp("TML", NOW)
    assert env.queue("A") == []


def test_set_at_in_the_past_relative_to_after_runs_once_late(env: Env) -> None:
    assert env.bike.set("a:A", f"AT:{NOW - 100:.0f}", after=NOW - 50) == "PLACED"
    assert env.bike.set("b:A", f"AT:{NOW - 100:.0f}") == "PLACED"  # after defaults to now
    assert env.status("a:A") == env.status("b:A") == stamp("ENQ", NOW)
    assert env.timeline() == {}
    assert env.queue("A") == ["b:A", "a:A"]
    assert env.schedule("a:A") == f"AT:{NOW - 100:.0f}"
    # Set again with the same schedule (a CSV loaded again): it was entered, so it is left alone.
    env.c.hset(env.keys.statuses, "a:A", stamp("END", NOW))
    env.c.lrem(env.keys.queue("A"), 0, "a:A")
    assert env.bike.set("a:A", f"AT:{NOW - 100:.0f}", after=NOW - 50) == "KEPT"
    assert env.status("a:A") == stamp("END", NOW) and env.queue("A") == ["b:A"]
    # A new time is a new one-off.
    assert env.bike.set("a:A", f"AT:{NOW - 90:.0f}", after=NOW - 50) == "PLACED"
    assert env.queue("A") == ["a:A", "b:A"]


def test_set_at_between_after_and_now_is_queued(env: Env) -> None:
    env.bike.set("a:A", f"AT:{NOW - 100:.0f}", after=NOW - 200)
    assert env.queue("A") == ["a:A"]
    assert env.status("a:A") == stamp("ENQ", NOW)
    assert env.timeline() == {}


def test_set_rrule_and_cron_go_to_the_next_occurrence(env: Env) -> None:
    env.bike.set("h:A", HOURLY)
    env.bike.set("q:B", CRON15)
    env.bike.set("m:A", "FREQ=MINUTELY;INTERVAL=10")  # anchored at `after` (now)
    env.bike.set("r:A", "RRULE:FREQ=MINUTELY;INTERVAL=10", after=NOW - 300)
    assert env.timeline() == {"h:A": NEXT_HOUR, "q:B": NEXT_15, "m:A": NOW + 600, "r:A": NOW + 300}
    assert all(env.status(j) == stamp("TML", NOW) for j in ("h:A", "q:B", "m:A", "r:A"))
    assert env.queue("A") == env.queue("B") == []


def test_set_stop(env: Env) -> None:
    env.bike.set("s:A", "STOP")
    assert env.status("s:A") == stamp("STP", NOW)
    assert env.schedule("s:A") == "STOP"
    assert env.timeline() == {} and env.queue("A") == []
    # STOP takes a queued job out of its queue and a timeline job off the timeline
    env.bike.set("q:A", "NOW")
    env.bike.set("t:A", HOURLY)
    env.at(NOW + 5)
    env.bike.set("q:A", "STOP")
    env.bike.set("t:A", "STOP")
    assert env.queue("A") == []
    assert env.timeline() == {}
    assert env.status("q:A") == env.status("t:A") == stamp("STP", NOW + 5)


def test_due_occurrence_since_after_is_queued_once(env: Env) -> None:
    # three hourly occurrences fell between `after` and now: one run, not three
    assert env.bike.set("h:A", HOURLY, after=NOW - 3 * HOUR) == "PLACED"
    assert env.queue("A") == ["h:A"]
    assert env.timeline() == {}
    assert env.status("h:A") == stamp("ENQ", NOW)


def test_due_occurrence_since_the_timefile_is_queued_once(c: redis.Redis, prefix: str, tmp_path: Path) -> None:
    timefile = tmp_path / "timefile"
    write_timefile(str(timefile), NOW - 3 * HOUR)
    clock = Clock(NOW)
    bike = Redbike(Worker("A"), prefix=prefix, client=c, clock=clock, timefile=str(timefile))
    bike.set("h:A", HOURLY)
    assert c.lrange(bike.keys.queue("A"), 0, -1) == ["h:A"]
    # --after overrides the timefile
    bike.set("k:A", HOURLY, after=NOW)
    assert c.zscore(bike.keys.timeline, "k:A") == NEXT_HOUR
    # a timefile with no occurrence since: the timeline
    write_timefile(str(timefile), NOW - 60)
    bike.set("j:A", HOURLY)
    assert c.zscore(bike.keys.timeline, "j:A") == NEXT_HOUR
    assert c.lrange(bike.keys.queue("A"), 0, -1) == ["h:A"]


def test_set_many_counts_from_one_start(env: Env) -> None:
    errors = env.bike.set_many([("h:A", HOURLY), ("bad:A", "FREQ=NEVER"), ("q:B", CRON15)], after=NOW - 3 * HOUR)
    assert len(errors) == 1 and errors[0].startswith("bad:A: bad schedule")
    assert env.queue("A") == ["h:A"]
    assert env.queue("B") == ["q:B"]
    assert env.status("bad:A") == stamp("BAD", NOW)


def test_bad_schedule_on_a_new_job_is_recorded_bad(env: Env) -> None:
    with pytest.raises(ScheduleError, match="recorded with status BAD"):
        env.bike.set("x:A", "  FREQ=NEVER  ")
    assert env.status("x:A") == stamp("BAD", NOW)
    assert env.schedule("x:A") == "FREQ=NEVER"
    assert env.timeline() == {} and env.queue("A") == []


def test_bad_schedule_on_an_existing_job_changes_nothing(env: Env) -> None:
    env.bike.set("h:A", HOURLY)
    env.bike.set("n:A", "NOW")
    before = env.snapshot("A")
    env.at(NOW + 100)
    with pytest.raises(ScheduleError, match="keeps its previous schedule"):
        env.bike.set("h:A", "FREQ=NEVER")
    with pytest.raises(ScheduleError, match="keeps its previous schedule"):
        env.bike.set("n:A", "not a schedule")
    assert env.snapshot("A") == before
    assert env.schedule("h:A") == HOURLY
    assert env.status("h:A") == stamp("TML", NOW)


def test_bad_job_id_is_refused(env: Env) -> None:
    for jobid in ("", "  ", "a\nb:A"):
        with pytest.raises(JobIdError):
            env.bike.set(jobid, "NOW")
    assert env.c.hgetall(env.keys.schedules) == {}


def test_set_now_on_a_queued_job_keeps_one_copy_in_place(env: Env) -> None:
    env.bike.set("a:A", "NOW")
    env.bike.set("b:A", "NOW")
    env.at(NOW + 7)
    assert env.bike.set("a:A", "NOW") == "PLACED"
    assert env.bike.set("a:A", "CONTINUE") == "PLACED"
    assert env.queue("A") == ["b:A", "a:A"]  # a keeps its place at the head
    assert env.status("a:A") == stamp("ENQ", NOW)  # still queued since NOW
    assert env.schedule("a:A") == "CONTINUE"


def test_reset_of_a_timeline_job_moves_it(env: Env) -> None:
    env.bike.set("a:A", f"AT:{NOW + 30:.0f}")
    env.at(NOW + 1)
    env.bike.set("a:A", f"AT:{NOW + 90:.0f}")
    assert env.timeline() == {"a:A": NOW + 90}
    assert env.status("a:A") == stamp("TML", NOW + 1)
    env.bike.set("a:A", "NOW")  # timeline -> queue
    assert env.timeline() == {}
    assert env.queue("A") == ["a:A"]
    env.bike.set("a:A", HOURLY)  # queue -> timeline
    assert env.queue("A") == []
    assert env.timeline() == {"a:A": NEXT_HOUR}
    assert env.status("a:A") == stamp("TML", NOW + 1)


# ============================================================ 2. unset

def test_unset_from_the_timeline(env: Env) -> None:
    env.bike.set("a:A", HOURLY)
    env.bike.set("b:A", HOURLY)
    assert env.bike.unset("a:A") == 1
    assert env.timeline() == {"b:A": NEXT_HOUR}
    env.assert_no_trace("a:A", "A")


def test_unset_from_a_queue(env: Env) -> None:
    env.bike.set("a:A", "NOW")
    env.bike.set("b:A", "NOW")
    assert env.bike.unset("a:A") == 1
    assert env.queue("A") == ["b:A"]
    env.assert_no_trace("a:A", "A")
    assert env.status("b:A") == stamp("ENQ", NOW)


def test_unset_unknown_job(env: Env) -> None:
    assert env.bike.unset("nobody:A") == 0
    env.bike.set("a:A", "NOW")
    assert env.bike.unset("a:A") == 1
    assert env.bike.unset("a:A") == 0


def test_unset_of_a_running_job(env: Env) -> None:
    env.bike.set("r:A", "CONTINUE")
    pool = env.pool()
    job = env.claim(pool)
    assert job.lease.jobid == "r:A"
    assert env.bike.unset("r:A") == 2
    assert env.schedule("r:A") is None and env.status("r:A") is None
    assert "r:A" in env.leases()  # the run goes on
    told = env.bike.tell("r:A")
    assert told["lease"]["worker"] == "w1" and "unset" in told
    env.at(NOW + 3)
    # even an error outcome leaves nothing behind
    done, _ = pool.finish(job, Outcome("error", error="ValueError: late"), "Traceback ...", None, "w1")
    assert done == "GONE"
    env.assert_no_trace("r:A", "A")
    assert env.bike.tell("r:A") is None


# ============================================================ 3. claim

def test_claim_writes_the_lease_and_deadline(c: redis.Redis, prefix: str) -> None:
    env = Env(c, prefix, queues="A:S:L")
    env.bike.set("a:A", "NOW")
    env.bike.set("s:S", "NOW")
    env.bike.set("l:L", "NOW")
    env.at(NOW + 4)
    pool = env.pool()
    rotation = Rotation(pool.queue_names)
    jobs = [pool.claim(rotation, "w1") for _ in range(3)]
    assert [j.lease.jobid for j in jobs] == ["a:A", "s:S", "l:L"]
    since = NOW + 4
    assert env.leases() == {
        "a:A": f"{jobs[0].lease.token}|A|w1|{since:.0f}|10.0|{NOW:.0f}|1|",
        "s:S": f"{jobs[1].lease.token}|S|w1|{since:.0f}|3.0|{NOW:.0f}|1|",
        "l:L": f"{jobs[2].lease.token}|L|w1|{since:.0f}|60.0|{NOW:.0f}|1|",
    }
    # deadline = now + min(timeout, lease seconds) + grace
    assert env.deadlines() == {
        "a:A": since + 10 + GRACE_SECONDS,
        "s:S": since + 3 + GRACE_SECONDS,
        "l:L": since + LEASE_SECONDS + GRACE_SECONDS,
    }
    assert all(env.status(j) == stamp("WRK", since) for j in ("a:A", "s:S", "l:L"))
    assert (jobs[0].job.due, jobs[0].job.attempt) == (NOW, 1)  # the occurrence it was enqueued for
    assert (jobs[0].lease.due, jobs[0].lease.attempt) == (NOW, 1)  # work() sees them on self.lease
    assert jobs[0].schedule == "NOW"
    assert env.queue("A") == env.queue("S") == env.queue("L") == []
    assert len({j.lease.token for j in jobs}) == 3


def test_claim_from_empty_queues(env: Env) -> None:
    pool = env.pool()
    assert env.claim(pool) is None
    assert env.leases() == {} and env.deadlines() == {}
    assert not pool.stopping


def test_claim_follows_the_weighted_rotation(c: redis.Redis, prefix: str) -> None:
    env = Env(c, prefix, queues="A:A:B")
    for i in range(6):
        env.bike.set(f"a{i}:A", "CONTINUE")
        env.bike.set(f"b{i}:B", "CONTINUE")
    pool = env.pool()
    rotation = Rotation(pool.queue_names)
    claimed = [pool.claim(rotation, "w1").lease.jobid for _ in range(9)]
    assert claimed == ["a0:A", "a1:A", "b0:B", "a2:A", "a3:A", "b1:B", "a4:A", "a5:A", "b2:B"]
    # A is empty now: its turns go to B
    assert [pool.claim(rotation, "w1").lease.jobid for _ in range(3)] == ["b3:B", "b4:B", "b5:B"]
    assert pool.claim(rotation, "w1") is None


def test_claim_drops_an_id_without_a_schedule(env: Env) -> None:
    env.c.lpush(env.keys.queue("A"), "ghost:A")  # as left by a foreign writer's unset
    env.bike.set("real:A", "NOW")
    assert env.queue("A") == ["real:A", "ghost:A"]
    job = env.claim()
    assert job.lease.jobid == "real:A"
    assert env.queue("A") == []
    assert list(env.leases()) == ["real:A"]
    assert env.status("ghost:A") is None


def test_halt_stops_older_pools_but_not_newer_ones(env: Env) -> None:
    env.bike.set("a:A", "NOW")
    env.bike.set("b:A", "NOW")
    old = env.pool()  # started before the HALT
    assert old.control_seen == ""
    value = env.bike.control()
    assert value.startswith(f"HALT:{int(NOW)}:")
    assert env.c.get(env.keys.control) == value
    assert env.claim(old) is None
    assert old.stopping
    assert env.queue("A") == ["b:A", "a:A"] and env.leases() == {}
    new = env.pool()  # started after it: has seen it
    assert new.control_seen == value
    job = env.claim(new)
    assert job.lease.jobid == "a:A"
    assert not new.stopping
    # a later HALT stops the newer pool too, in the fused claim as well
    env.bike.control()
    done, nxt = new.finish(job, Outcome("ok"), "", Rotation(new.queue_names), "w1")
    assert done == "DONE" and nxt is None
    assert new.stopping
    assert env.queue("A") == ["b:A"]
    with pytest.raises(ValueError):
        env.bike.control("GO")


# ============================================================ 4. finish

def run_once(env: Env, jobid: str, schedule: str, outcome: Outcome, trace: str = "", finish_at: float = NOW + 5):
    """Set a job, claim it at NOW, finish it at finish_at; returns the finish result."""
    env.bike.set(jobid, schedule, after=NOW - 3 * HOUR)
    pool = env.pool()
    job = env.claim(pool)
    assert job is not None and job.lease.jobid == jobid
    env.at(finish_at)
    done, nxt = pool.finish(job, outcome, trace, None, "w1")
    assert nxt is None
    assert env.leases() == {} and env.deadlines() == {} and env.pending() == {}
    return done


def test_finish_ok_on_a_recurring_job_goes_to_the_next_occurrence(env: Env) -> None:
    assert run_once(env, "h:A", HOURLY, Outcome("ok")) == "DONE"
    assert env.timeline() == {"h:A": NEXT_HOUR}
    assert env.status("h:A") == stamp("TML", NOW + 5)
    assert env.queue("A") == []
    assert env.errors() == {}


def test_finish_ok_counts_from_the_runs_occurrence_when_the_worker_clock_lags(env: Env) -> None:
    env.bike.set("h:A", HOURLY)
    d = env.dispatcher()
    env.at(NEXT_HOUR + 30)  # the dispatcher's clock
    assert d.lead(NEXT_HOUR + 30)
    assert d.move_due(NEXT_HOUR + 30) == 1
    assert env.status("h:A") == stamp("ENQ", NEXT_HOUR + 30)
    env.at(NEXT_HOUR - 10)  # the worker's clock lags 40s
    pool = env.pool()
    job = env.claim(pool)
    assert job.job.due == NEXT_HOUR  # the occurrence it runs for, not when it was enqueued
    assert pool.finish(job, Outcome("ok"), "", None, "w1")[0] == "DONE"
    assert env.timeline() == {"h:A": NEXT_HOUR + HOUR}  # not 23:00 again


def test_finish_ok_on_a_cron_job(env: Env) -> None:
    assert run_once(env, "q:A", CRON15, Outcome("ok"), finish_at=NEXT_15 + 1) == "DONE"
    assert env.timeline() == {"q:A": NEXT_15 + 900}


@pytest.mark.parametrize("schedule", ["NOW", f"AT:{NOW - 60:.0f}"])
def test_finish_ok_on_a_one_off_job_ends_it(env: Env, schedule: str) -> None:
    assert run_once(env, "o:A", schedule, Outcome("ok")) == "DONE"
    assert env.status("o:A") == stamp("END", NOW + 5)
    assert env.timeline() == {} and env.queue("A") == []
    assert env.schedule("o:A") == schedule


def test_finish_ok_on_continue_requeues(env: Env) -> None:
    assert run_once(env, "c:A", "CONTINUE", Outcome("ok")) == "DONE"
    assert env.queue("A") == ["c:A"]
    assert env.status("c:A") == stamp("ENQ", NOW + 5)
    assert env.timeline() == {}


def test_finish_continue_with_backoff(env: Env) -> None:
    assert run_once(env, "c:A", "CONTINUE", Outcome("ok", backoff=5)) == "DONE"
    assert env.timeline() == {"c:A": NOW + 5 + 5}
    assert env.status("c:A") == stamp("TML", NOW + 5)
    assert env.queue("A") == []


def test_finish_error_records_die(env: Env) -> None:
    trace = 'Traceback (most recent call last):\n  File "w.py", line 1\nValueError: boom\n'
    assert run_once(env, "e:A", "CONTINUE", Outcome("error", error="ValueError: boom"), trace) == "DONE"
    assert env.status("e:A") == stamp("DIE", NOW + 5)
    assert env.schedule("e:A") == "CONTINUE"
    assert env.timeline() == {} and env.queue("A") == []
    assert env.errors() == {
        "e:A": {"status": "DIE", "at": NOW + 5, "error": "ValueError: boom", "worker": "w1", "traceback": trace}
    }


def test_finish_stopwork_stops_the_job(env: Env) -> None:
    assert run_once(env, "s:A", HOURLY, Outcome("stop")) == "DONE"
    assert env.schedule("s:A") == "STOP"
    assert env.status("s:A") == stamp("STP", NOW + 5)
    assert env.timeline() == {} and env.queue("A") == []


def test_finish_unsetjob_forgets_the_job(env: Env) -> None:
    env.c.hset(env.keys.errors, "u:A", json.dumps({"error": "an old one"}))
    assert run_once(env, "u:A", "CONTINUE", Outcome("unset")) == "DONE"
    env.assert_no_trace("u:A", "A")


def test_finish_expired_puts_the_job_back_with_exp(env: Env) -> None:
    error = "killed: timed out after 10s"
    assert run_once(env, "n:A", "NOW", Outcome("expired", error=error), finish_at=NOW + 12) == "DONE"
    assert env.timeline() == {"n:A": NOW + 12}
    assert env.status("n:A") == stamp("EXP", NOW + 12)
    assert env.errors() == {"n:A": {"status": "EXP", "at": NOW + 12, "error": error, "worker": "w1"}}


def test_finish_expired_on_a_recurring_job_retries_then_waits_for_the_next_occurrence(env: Env) -> None:
    env.bike.set("h:A", HOURLY, after=NOW - HOUR)  # its 22:00 occurrence is due
    pool, d = env.pool(), env.dispatcher()
    for attempt in (1, 2, 3):
        job = env.claim(pool)
        assert (job.lease.jobid, job.lease.due, job.lease.attempt) == ("h:A", NEXT_HOUR - HOUR, attempt)
        env.at(NOW + 12 * attempt)
        assert pool.finish(job, Outcome("expired", error="killed"), "", None, "w1")[0] == "DONE"
        assert env.status("h:A") == stamp("EXP", NOW + 12 * attempt)
        if attempt < 3:  # retried (jitter 0 here: at once), for the same occurrence
            assert env.timeline() == {"h:A": NOW + 12 * attempt}
            assert d.step(NOW + 12 * attempt) == 0.0
    assert env.timeline() == {"h:A": NEXT_HOUR}  # retries used up: its next occurrence


def test_finish_with_a_stale_token_changes_nothing(env: Env) -> None:
    env.bike.set("n:A", "NOW")
    pool = env.pool()
    job = env.claim(pool)
    d = env.dispatcher()
    env.at(NOW + 12)
    assert d.lead(NOW + 12)
    assert d.reap(NOW + 12) == 1
    assert d.move_due(NOW + 12) == 1
    other = env.claim(env.pool(), "w2")  # the retry runs elsewhere
    assert other.lease.jobid == "n:A" and other.lease.token != job.lease.token
    before = env.snapshot("A")
    env.at(NOW + 20)
    done, nxt = pool.finish(job, Outcome("ok"), "", None, "w1")
    assert done == "STALE" and nxt is None
    assert env.snapshot("A") == before
    assert env.leases()["n:A"].startswith(other.lease.token + "|")
    assert env.status("n:A") == stamp("WRK", NOW + 12)


def test_set_while_running_applies_the_new_schedule_after_the_run(env: Env) -> None:
    env.bike.set("p:A", "NOW")
    pool = env.pool()
    job = env.claim(pool)
    env.at(NOW + 1)
    assert env.bike.set("p:A", f"AT:{NOW + 300:.0f}") == "PENDING"
    assert env.schedule("p:A") == f"AT:{NOW + 300:.0f}"
    assert env.status("p:A") == stamp("WRK", NOW)  # untouched while it runs
    assert env.pending() == {"p:A": f"T|{NOW + 300:.0f}|TML|{NOW + 300:.0f}|1|0|0"}
    assert env.timeline() == {} and env.queue("A") == []
    env.at(NOW + 5)
    # the run's own placement (NOW, ok: END) gives way to the pending one
    assert pool.finish(job, Outcome("ok"), "", None, "w1")[0] == "DONE"
    assert env.timeline() == {"p:A": NOW + 300}
    assert env.status("p:A") == stamp("TML", NOW + 5)
    assert env.pending() == {} and env.leases() == {}


@pytest.mark.parametrize(
    "new, where",
    [("NOW", "queue"), ("STOP", "STP"), (HOURLY, "timeline")],
)
def test_set_while_running_wins_over_the_outcome(env: Env, new: str, where: str) -> None:
    env.bike.set("p:A", "CONTINUE")
    pool = env.pool()
    job = env.claim(pool)
    assert env.bike.set("p:A", new) == "PENDING"
    env.at(NOW + 5)
    assert pool.finish(job, Outcome("error", error="E: x"), "", None, "w1")[0] == "DONE"
    if where == "queue":
        assert env.queue("A") == ["p:A"] and env.status("p:A") == stamp("ENQ", NOW + 5)
    elif where == "STP":
        assert env.queue("A") == [] and env.status("p:A") == stamp("STP", NOW + 5)
    else:
        assert env.timeline() == {"p:A": NEXT_HOUR} and env.status("p:A") == stamp("TML", NOW + 5)
    assert env.errors()["p:A"]["error"] == "E: x"  # the run's failure is still kept for tell
    assert env.pending() == {}


def test_fused_finish_claims_the_next_job(env: Env) -> None:
    env.bike.set("a:A", "NOW")
    env.bike.set("b:B", "NOW")
    pool = env.pool()
    rotation = Rotation(pool.queue_names)
    first = pool.claim(rotation, "w1")
    assert first.lease.jobid == "a:A"
    env.at(NOW + 2)
    done, second = pool.finish(first, Outcome("ok"), "", rotation, "w1")
    assert done == "DONE"
    assert second.lease.jobid == "b:B" and second.lease.queue == "B"
    assert second.lease.token != first.lease.token
    assert env.status("a:A") == stamp("END", NOW + 2)
    assert env.status("b:B") == stamp("WRK", NOW + 2)
    assert env.leases() == {"b:B": f"{second.lease.token}|B|w1|{NOW + 2:.0f}|10.0|{NOW:.0f}|1|"}
    assert env.deadlines() == {"b:B": NOW + 2 + 10 + GRACE_SECONDS}
    done, third = pool.finish(second, Outcome("ok"), "", rotation, "w1")
    assert done == "DONE" and third is None
    assert env.leases() == {}


# ============================================================ 5. dispatcher

def test_lead_gives_one_token_at_a_time(env: Env) -> None:
    d1, d2 = env.dispatcher(), env.dispatcher()
    assert d1.lead(NOW) is True
    assert d1.token == env.c.get(env.keys.dispatcher)
    assert d1.token == f"1:{d1.identity}"
    assert d2.lead(NOW) is False and d2.token is None
    assert d1.lead(NOW + 1) is True and d1.token == f"1:{d1.identity}"  # renewed, same token
    assert d2.step(NOW + 1) == STANDBY_SECONDS
    # giving it up lets the other one lead, with a higher epoch
    assert d1.lead(NOW + 2, milliseconds=0) is False and d1.token is None
    assert env.c.get(env.keys.dispatcher) is None
    assert d2.lead(NOW + 2) is True and d2.token == f"2:{d2.identity}"


def test_lead_reports_the_next_due_and_deadline(env: Env) -> None:
    d = env.dispatcher()
    assert d.lead(NOW)
    assert d.next_due == float("inf") and d.next_deadline == float("inf")
    env.bike.set("h:A", HOURLY)
    env.bike.set("n:A", "NOW")
    env.claim()
    assert d.lead(NOW)
    assert d.next_due == NEXT_HOUR
    assert d.next_deadline == NOW + 10 + GRACE_SECONDS
    env.bike.control()
    d.lead(NOW)
    assert d.stopping.is_set()


def _takeover(env: Env, d1: Dispatcher) -> Dispatcher:
    d2 = env.dispatcher()
    assert d2.lead(NOW) is True
    assert d2.token.startswith("2:") and d2.token != d1.token
    return d2


def _assert_fenced(env: Env, d1: Dispatcher, d2: Dispatcher) -> None:
    env.bike.set("due:A", f"AT:{NOW + 10:.0f}")
    with pytest.raises(redis.ResponseError, match="FENCED"):
        d1.move_due(NOW + 10)
    assert env.timeline() == {"due:A": NOW + 10} and env.queue("A") == []
    assert d1.lead(NOW + 10) is False and d1.token is None  # and it knows it now
    assert d2.move_due(NOW + 10) == 1
    assert env.queue("A") == ["due:A"]


def test_expired_lead_passes_to_a_new_fenced_token(real: Env) -> None:
    d1 = real.dispatcher()
    assert d1.lead(NOW, milliseconds=50)
    assert real.dispatcher().lead(NOW) is False
    wait_for(lambda: real.c.get(real.keys.dispatcher) is None, what="the dispatcher lease to expire")
    d2 = _takeover(real, d1)
    _assert_fenced(real, d1, d2)


def test_lost_lead_is_fenced(env: Env) -> None:
    d1 = env.dispatcher()
    assert d1.lead(NOW)
    env.c.delete(env.keys.dispatcher)  # as if its lease ran out
    d2 = _takeover(env, d1)
    # reap is fenced too
    env.bike.set("r:A", "NOW")
    env.claim()
    with pytest.raises(redis.ResponseError, match="FENCED"):
        d1.reap(NOW + 100)
    assert "r:A" in env.leases() and env.status("r:A") == stamp("WRK", NOW)
    _assert_fenced(env, d1, d2)


def test_move_due_moves_only_due_jobs(env: Env) -> None:
    env.bike.set("early:A", f"AT:{NOW + 10:.0f}")
    env.bike.set("exact:B", f"AT:{NOW + 20:.0f}")
    env.bike.set("late:A", f"AT:{NOW + 21:.0f}")
    d = env.dispatcher()
    env.at(NOW + 20)
    assert d.lead(NOW + 20)
    assert d.move_due(NOW + 20) == 2
    assert env.queue("A") == ["early:A"] and env.queue("B") == ["exact:B"]
    assert env.timeline() == {"late:A": NOW + 21}
    assert env.status("early:A") == env.status("exact:B") == stamp("ENQ", NOW + 20)
    assert env.status("late:A") == stamp("TML", NOW)
    assert d.move_due(NOW + 20) == 0


def test_move_due_in_batches(env: Env) -> None:
    jobs = [f"j{i}:{'AB'[i % 2]}" for i in range(10)]
    for i, jobid in enumerate(jobs):
        env.bike.set(jobid, f"AT:{NOW + 1 + i:.0f}")
    env.bike.set("later:A", f"AT:{NOW + 100:.0f}")
    d = env.dispatcher(batch=3)
    calls: list[str] = []
    run = d.scripts.run

    def spy(name, now, keys, args, client=None):
        calls.append(name)
        return run(name, now, keys, args, client)

    d.scripts.run = spy
    assert d.lead(NOW + 50)
    assert d.move_due(NOW + 50) == 10
    assert calls.count("move_due") == 4  # 3 + 3 + 3 + 1
    queued = env.queue("A") + env.queue("B")
    assert sorted(queued) == sorted(jobs)  # each once
    assert env.queue("A") == [j for j in reversed(jobs) if j.endswith("A")]  # in due order
    assert env.timeline() == {"later:A": NOW + 100}
    assert d.moved == 10


def test_step_moves_and_reaps(env: Env) -> None:
    env.bike.set("n:A", "NOW")
    env.bike.set("t:B", f"AT:{NOW + 10:.0f}")
    env.claim(env.pool("A"))
    d = env.dispatcher()
    assert d.step(NOW + 1) == pytest.approx(RENEW_SECONDS)  # nothing due yet: renew first
    assert d.step(NOW + 9.5) == pytest.approx(0.5)  # sleep until t:B is due
    assert env.timeline() == {"t:B": NOW + 10} and env.leases() != {}
    assert d.step(NOW + 12) == 0.0  # busy: moved t:B, reaped n:A
    assert env.queue("B") == ["t:B"]
    assert env.timeline() == {"n:A": NOW + 12}
    assert env.status("n:A") == stamp("EXP", NOW + 12)


class Told(Subscriber):
    """The job events a test was told of."""

    def __init__(self) -> None:
        self.ends: list[tuple[Lease, str]] = []
        self.retries: list[tuple[str, int, float]] = []

    def expired(self, lease: Lease, reason: str) -> None:
        self.ends.append((lease, reason))

    def retried(self, lease: Lease, attempt: int, at: float) -> None:
        self.retries.append((lease.jobid, attempt, at))


def test_reap_of_an_expired_lease(env: Env) -> None:
    env.bike.set("n:A", "NOW")
    job = env.claim()
    told = Told()
    d = env.dispatcher(events=told)
    assert d.lead(NOW + 11)
    assert d.reap(NOW + 11) == 0  # not yet: deadline is NOW + 12
    assert env.status("n:A") == stamp("WRK", NOW)
    env.at(NOW + 12)
    assert d.reap(NOW + 12) == 1
    # The reaper tells the job events seam, with the run's lease and why.
    assert [(lease.jobid, lease.token, lease.worker) for lease, _ in told.ends] == [("n:A", job.lease.token, "w1")]
    assert told.ends[0][1] == "lease of worker w1 expired; back in the timeline for 2023-11-14T22:13:32Z (status EXP)"
    assert told.retries == [("n:A", 2, NOW + 12)]  # the same occurrence runs again: its second attempt
    assert env.status("n:A") == stamp("EXP", NOW + 12)
    assert env.timeline() == {"n:A": NOW + 12}
    assert env.leases() == {} and env.deadlines() == {}
    error = env.errors()["n:A"]
    assert error["status"] == "EXP" and error["worker"] == "w1" and error["at"] == NOW + 12
    assert "worker w1" in error["error"] and "12s" in error["error"]
    assert job.lease.token not in json.dumps(error)


def test_reap_of_a_recurring_job_retries_its_occurrence(env: Env) -> None:
    env.bike.set("h:A", HOURLY, after=NOW - HOUR)
    env.claim()
    d = env.dispatcher()
    assert d.lead(NOW + 12)
    assert d.reap(NOW + 12) == 1
    assert env.timeline() == {"h:A": NOW + 12}  # jitter 0 here: at once
    assert decode_job(env.c.hget(env.keys.jobs, "h:A")).attempt == 2
    assert env.status("h:A") == stamp("EXP", NOW + 12)
    assert env.leases() == {} and env.deadlines() == {}


def test_reap_of_a_job_unset_while_it_ran(env: Env) -> None:
    env.bike.set("u:A", "CONTINUE")
    env.claim()
    assert env.bike.unset("u:A") == 2
    d = env.dispatcher()
    assert d.lead(NOW + 12)
    assert d.reap(NOW + 12) == 1
    env.assert_no_trace("u:A", "A")


def test_reap_applies_a_set_made_while_the_job_ran(env: Env) -> None:
    env.bike.set("p:A", "NOW")
    env.claim()
    assert env.bike.set("p:A", HOURLY) == "PENDING"
    d = env.dispatcher()
    assert d.lead(NOW + 12)
    assert d.reap(NOW + 12) == 1
    assert env.timeline() == {"p:A": NEXT_HOUR}  # not the EXP retry at NOW + 12
    assert env.status("p:A") == stamp("TML", NOW + 12)
    assert env.pending() == {} and env.leases() == {}
    assert env.errors()["p:A"]["worker"] == "w1"


def test_step_writes_the_timefile(env: Env, tmp_path: Path) -> None:
    timefile = tmp_path / "timefile"
    d = env.dispatcher(timefile=str(timefile))
    d.step(NOW + 3)
    assert read_timefile(str(timefile)) == NOW + 3
    standby = env.dispatcher(timefile=str(tmp_path / "other"))
    assert standby.step(NOW + 4) == STANDBY_SECONDS
    assert read_timefile(str(tmp_path / "other")) is None  # only the leader keeps it


def test_renewed_lease_is_not_reaped(env: Env) -> None:
    env.bike.set("l:L", "NOW")
    pool = env.pool("L")
    job = env.claim(pool)
    assert env.deadlines() == {"l:L": NOW + LEASE_SECONDS + GRACE_SECONDS}
    lease = job.lease
    now = NOW + 10
    # the heartbeat's deadline: min(now + lease seconds, since + timeout) + grace
    deadline = min(now + pool.lease_seconds, lease.since + lease.timeout) + GRACE_SECONDS
    lost = pool.scripts.run("renew", now, [], [lease.jobid, lease.token, repr(deadline)])
    assert lost == []
    assert env.deadlines() == {"l:L": NOW + 27}
    d = env.dispatcher()
    assert d.lead(NOW + 20)
    assert d.reap(NOW + 20) == 0
    assert env.leases()["l:L"].startswith(lease.token + "|")
    assert env.status("l:L") == stamp("WRK", NOW)
    # a renewal with a token that no longer holds the lease changes nothing
    lost = pool.scripts.run("renew", now, [], ["l:L", "not-the-token", repr(NOW + 500)])
    assert lost == ["l:L"]
    assert env.deadlines() == {"l:L": NOW + 27}
    assert d.reap(NOW + 27) == 1
    assert env.status("l:L") == stamp("EXP", NOW + 27)


def test_reap_leaves_a_lease_renewed_after_it_looked(env: Env) -> None:
    """The reap script checks the deadline again: a heartbeat that lands between
    the dispatcher's read of the deadlines and its script keeps the lease."""
    env.bike.set("l:L", "NOW")
    pool = env.pool("L")
    job = env.claim(pool)
    d = env.dispatcher()
    assert d.lead(NOW + 17)
    run = d.scripts.run

    def heartbeat_first(name, now, keys, args, client=None):
        if name == "reap":
            pool.scripts.run("renew", NOW + 16, [], ["l:L", job.lease.token, repr(NOW + 33)])
        return run(name, now, keys, args, client)

    d.scripts.run = heartbeat_first
    told = Told()
    d.events = told
    assert d.reap(NOW + 17) == 0
    assert told.ends == []  # the script left it alone: no event either
    assert env.deadlines() == {"l:L": NOW + 33}
    assert env.leases()["l:L"].startswith(job.lease.token + "|")
    assert env.status("l:L") == stamp("WRK", NOW) and env.timeline() == {} and env.errors() == {}


def test_heartbeat_renews_running_leases(real: Env) -> None:
    real.bike.set("l:L", "NOW")
    pool = real.pool("L", lease_seconds=0.03)  # heartbeat interval 0.01s
    job = real.claim(pool)
    assert real.deadlines() == {"l:L": NOW + 0.03 + GRACE_SECONDS}
    pool.board.write(0, [job])
    real.at(NOW + 40)
    beat = threading.Thread(target=pool._heartbeat)
    beat.start()
    try:
        expected = NOW + 40 + 0.03 + GRACE_SECONDS
        wait_for(lambda: real.c.zscore(real.keys.deadlines, "l:L") == expected, what="the heartbeat")
    finally:
        pool.done.set()
        beat.join()
    d = real.dispatcher()
    assert d.lead(NOW + 40)
    assert d.reap(NOW + 40) == 0
    assert real.status("l:L") == stamp("WRK", NOW)


def test_wake_up_messages(real: Env) -> None:
    """A push onto an empty queue wakes its workers; a job set earlier than the
    whole timeline wakes the dispatcher; nothing else publishes."""
    keys = real.keys
    pubsub = subscribe(real.c, [keys.queue_channel("A"), keys.dispatcher_channel])

    def messages() -> list[tuple[str, str]]:
        got = []
        while (m := pubsub.get_message(timeout=0.2)) is not None:
            if m["type"] == "message":
                got.append((m["channel"], m["data"]))
        return got

    try:
        real.bike.set("a:A", "NOW")
        real.bike.set("b:A", "NOW")
        assert messages() == [(keys.queue_channel("A"), "1")]
        real.bike.set("t1:A", f"AT:{NOW + 60:.0f}")
        real.bike.set("t2:A", f"AT:{NOW + 90:.0f}")
        real.bike.set("t3:A", f"AT:{NOW + 30:.0f}")
        assert messages() == [(keys.dispatcher_channel, f"{NOW + 60:.0f}"), (keys.dispatcher_channel, f"{NOW + 30:.0f}")]
    finally:
        pubsub.close()


def test_retention_removes_what_jobs_that_ended_left_keep_finished_later(env: Env) -> None:
    keep = 7 * 86400
    env.bike.set("one:A", "NOW")
    env.bike.set("again:A", "NOW")
    env.bike.set("gone:A", HOURLY)
    env.bike.set("live:A", HOURLY)
    pool = env.pool()
    for _ in range(2):  # one:A and again:A run and end
        pool.finish(env.claim(pool), Outcome("ok"), "", None, "w1")
    env.bike.unset("gone:A")
    env.at(NOW + 10)
    env.bike.set("again:A", HOURLY)  # set again after it ended: not retired
    d = env.dispatcher()
    assert d.lead(NOW + keep - 1) and d.retire(NOW + keep - 1) == 0  # not yet
    assert env.status("one:A") == stamp("END", NOW) and trail_of(env.c.hget(env.keys.jobs, "gone:A"))
    assert d.retire(NOW + keep) == 3  # looked at one:A, again:A and gone:A
    for jobid in ("one:A", "gone:A"):
        env.assert_no_trace(jobid, "A")
        assert env.c.hget(env.keys.jobs, jobid) is None  # its record, and the trail with it
    for jobid in ("again:A", "live:A"):
        assert env.schedule(jobid) == HOURLY and trail_of(env.c.hget(env.keys.jobs, jobid))
    assert env.c.llen(env.keys.finished) == 0


# ============================================================ 6. report

def test_statuses_and_schedules_csv(client: redis.Redis, prefix: str, workdir: Path, monkeypatch, capsys) -> None:
    env = Env(client, prefix)
    env.bike.set("a:A", "NOW")
    env.bike.set("x,y:B", "0 9 * * 1,3")
    env.at(NOW + 100)
    env.bike.set("late:A", HOURLY)
    monkeypatch.chdir(workdir)
    assert main(["--config", ".redbike.conf", "statuses"]) == 0
    rows = sorted(capsys.readouterr().out.splitlines())
    assert rows == sorted([f"a:A,ENQ,{NOW:.0f}", f'"x,y:B",TML,{NOW:.0f}', f"late:A,TML,{NOW + 100:.0f}"])
    assert main(["--config", ".redbike.conf", "statuses", f"--before={NOW + 50:.0f}"]) == 0
    rows = sorted(capsys.readouterr().out.splitlines())
    assert rows == sorted([f"a:A,ENQ,{NOW:.0f}", f'"x,y:B",TML,{NOW:.0f}'])
    assert main(["--config", ".redbike.conf", "statuses", "--before=2023-11-14T22:13:20Z"]) == 0
    assert capsys.readouterr().out == ""  # strictly older only
    assert main(["--config", ".redbike.conf", "schedules"]) == 0
    rows = sorted(capsys.readouterr().out.splitlines())
    assert rows == sorted(["a:A,NOW", '"x,y:B","0 9 * * 1,3"', f"late:A,{HOURLY}"])


def test_statuses_and_schedules_api(env: Env) -> None:
    env.bike.set("a:A", "NOW")
    env.at(NOW + 100)
    env.bike.set("b:A", HOURLY)
    assert sorted(env.bike.statuses()) == [("a:A", "ENQ", int(NOW)), ("b:A", "TML", int(NOW) + 100)]
    assert list(env.bike.statuses(before=NOW + 100)) == [("a:A", "ENQ", int(NOW))]
    assert sorted(env.bike.schedules()) == [("a:A", "NOW"), ("b:A", HOURLY)]


def test_tell_through_a_jobs_life(env: Env) -> None:
    assert env.bike.tell("nobody:A") is None
    env.bike.set("h:A", HOURLY)
    ledger = {"fired": 0, "coalesced": 0, "skipped": 0, "cancelled": 0, "last_due": None}
    assert env.bike.tell("h:A") == {
        "status": stamp("TML", NOW), "next_run": NEXT_HOUR, "schedule": HOURLY, "event": "TML", "since": NOW,
        "misfire": "once", "retries": 0, "ledger": ledger,
    }
    env.bike.set("n:A", "NOW")
    env.bike.set("h:A", "CONTINUE", retries=2)
    assert env.bike.tell("h:A") == {
        "status": stamp("ENQ", NOW), "next_run": None, "schedule": "CONTINUE",
        "queue": "A", "queue_length": 2, "event": "ENQ", "since": NOW,
        "misfire": "once", "retries": 2, "due": NOW, "attempt": 1,
        "ledger": {**ledger, "fired": 1, "cancelled": 1, "last_due": NOW},  # its 23:00 occurrence was cancelled
    }
    pool = env.pool()
    job = env.claim(pool)
    assert job.lease.jobid == "n:A"
    told = env.bike.tell("n:A")
    assert told["status"] == stamp("WRK", NOW) and "queue" not in told
    assert told["lease"] == {
        "worker": "w1", "queue": "A", "since": NOW, "timeout": 10.0,
        "deadline": NOW + 10 + GRACE_SECONDS, "token": job.lease.token, "holds": None,
    }
    assert "after_this_run" not in told and "unset" not in told
    env.bike.set("n:A", f"AT:{NOW + 300:.0f}")
    assert env.bike.tell("n:A")["after_this_run"] == f"timeline at {NOW + 300:.0f}"
    env.bike.set("n:A", "NOW")
    assert env.bike.tell("n:A")["after_this_run"] == "enqueue"
    env.bike.set("n:A", "STOP")
    assert env.bike.tell("n:A")["after_this_run"] == "STP"
    env.bike.set("n:A", "CONTINUE")
    env.at(NOW + 3)
    pool.finish(job, Outcome("error", error="KeyError: 'x'"), "Traceback: ...", None, "w1")
    told = env.bike.tell("n:A")
    assert told["status"] == stamp("ENQ", NOW + 3)  # the pending CONTINUE wins
    assert "lease" not in told and "after_this_run" not in told
    job = env.claim(pool)  # h:A
    job = env.claim(pool)  # n:A
    assert job.lease.jobid == "n:A"
    pool.finish(job, Outcome("error", error="KeyError: 'x'"), "Traceback: ...", None, "w1")
    told = env.bike.tell("n:A")
    assert told["status"] == stamp("DIE", NOW + 3) and told["event"] == "DIE"
    assert told["last_error"] == {
        "status": "DIE", "at": NOW + 3, "error": "KeyError: 'x'", "worker": "w1", "traceback": "Traceback: ...",
    }


# ============================================================ 7. states and the CSV

def test_place_on_set() -> None:
    p = parse_schedule
    now_q = Placement("Q", "ENQ", due=NOW, attempt=1)
    assert place_on_set(p("NOW"), NOW, NOW) == now_q
    assert place_on_set(p("CONTINUE"), NOW, NOW) == now_q
    assert place_on_set(p("STOP"), NOW, NOW) == Placement("S", "STP")
    assert place_on_set(p(f"AT:{NOW + 30:.0f}"), NOW, NOW) == Placement("T", "TML", NOW + 30, NOW + 30, 1)
    late = Placement("Q", "ENQ", due=NOW - 30, attempt=1)
    assert place_on_set(p(f"AT:{NOW - 30:.0f}"), NOW - 60, NOW) == late
    assert place_on_set(p(f"AT:{NOW - 30:.0f}"), NOW - 10, NOW) == late  # late, but once
    assert place_on_set(p(f"AT:{NOW - 30:.0f}"), NOW - 10, NOW, "skip:10") == Placement("S", "SKP", skipped=1)
    assert place_on_set(p(f"AT:{NOW - 30:.0f}"), NOW - 10, NOW, "skip:60") == late
    assert place_on_set(p(f"AT:{NOW + 30:.0f}"), NOW + 60, NOW) == Placement("T", "TML", NOW + 30, NOW + 30, 1)
    assert place_on_set(p(f"AT:{NOW:.0f}"), NOW - 10, NOW) == Placement("Q", "ENQ", due=NOW, attempt=1)
    assert place_on_set(p(HOURLY), NOW, NOW) == Placement("T", "TML", NEXT_HOUR, NEXT_HOUR, 1)
    last_hour = NEXT_HOUR - HOUR
    assert place_on_set(p(HOURLY), NOW - HOUR, NOW) == Placement("Q", "ENQ", due=last_hour, attempt=1)
    # three occurrences missed since --after: once coalesces, all runs each, skip drops the stale
    assert place_on_set(p(HOURLY), NOW - 3 * HOUR, NOW) == Placement("Q", "ENQ", due=last_hour, attempt=1, coalesced=2)
    assert place_on_set(p(HOURLY), NOW - 3 * HOUR, NOW, "all") == Placement("Q", "ENQ", due=last_hour - 2 * HOUR,
                                                                            attempt=1)
    assert place_on_set(p(HOURLY), NOW - 3 * HOUR, NOW, "all:2") == Placement("Q", "ENQ", due=last_hour - HOUR,
                                                                              attempt=1, skipped=1)
    assert place_on_set(p(HOURLY), NOW - 3 * HOUR, NOW, "skip:60") == Placement("T", "TML", NEXT_HOUR, NEXT_HOUR, 1,
                                                                                skipped=3)
    assert place_on_set(p(CRON15), NOW, NOW) == Placement("T", "TML", NEXT_15, NEXT_15, 1)
    once = "DTSTART:20231114T000000Z RRULE:FREQ=DAILY;COUNT=1"
    assert place_on_set(p(once), NOW, NOW) == Placement("S", "END")


def test_place_after_run() -> None:
    def after(schedule: str, outcome: Outcome, now: float = NOW, due: float = NOW, **job) -> Placement:
        return place_after_run(schedule, outcome, now, JobRecord(due=due, **job), Retry(10, 100, jitter=lambda: 0.5))

    ok = Outcome("ok")
    assert after("CONTINUE", ok) == Placement("Q", "ENQ", due=NOW, attempt=1)
    assert after("CONTINUE", Outcome("ok", backoff=5)) == Placement("T", "TML", NOW + 5, NOW + 5, 1)
    assert after("CONTINUE", Outcome("ok", backoff=0)) == Placement("Q", "ENQ", due=NOW, attempt=1)
    assert after("NOW", ok) == after(f"AT:{NOW:.0f}", ok) == Placement("S", "END")
    assert after("STOP", ok) == Placement("S", "STP")
    assert after(HOURLY, ok, due=NEXT_HOUR - HOUR) == Placement("T", "TML", NEXT_HOUR, NEXT_HOUR, 1)
    # a worker clock behind the dispatcher's: the next occurrence is the one after the run's
    assert after(HOURLY, ok, now=NEXT_HOUR - 10, due=NEXT_HOUR) == Placement("T", "TML", NEXT_HOUR + HOUR,
                                                                             NEXT_HOUR + HOUR, 1)
    # ran past two occurrences: once coalesces them into this run, all runs them, skip drops the stale
    late = NEXT_HOUR + HOUR + 60
    assert after(HOURLY, ok, now=late, due=NEXT_HOUR - HOUR) == Placement(
        "T", "TML", NEXT_HOUR + 2 * HOUR, NEXT_HOUR + 2 * HOUR, 1, coalesced=2)
    assert after(HOURLY, ok, now=late, due=NEXT_HOUR - HOUR, misfire="all") == Placement(
        "Q", "ENQ", due=NEXT_HOUR, attempt=1)
    assert after(HOURLY, ok, now=late, due=NEXT_HOUR - HOUR, misfire="skip:120") == Placement(
        "Q", "ENQ", due=NEXT_HOUR + HOUR, attempt=1, skipped=1)
    assert after("DTSTART:20231114T000000Z RRULE:FREQ=DAILY;COUNT=1", ok) == Placement("S", "END")
    assert after("FREQ=NEVER", ok) == Placement("S", "BAD")
    assert after(HOURLY, Outcome("stop")) == STOPPED == Placement("X", "STP")
    assert after(HOURLY, Outcome("unset")) == FORGET == Placement("D", "")
    assert after(HOURLY, Outcome("error", error="E")) == Placement("S", "DIE")
    # retries: backoff 10 s doubling, full jitter (0.5 here), capped at 100 s; expiry counts too
    assert after(HOURLY, Outcome("error", error="E"), retries=5) == Placement("T", "RTY", NOW + 5, attempt=2)
    assert after(HOURLY, Outcome("error", error="E"), retries=5, attempt=3) == Placement("T", "RTY", NOW + 20, attempt=4)
    assert after(HOURLY, Outcome("error", error="E"), retries=9, attempt=9) == Placement("T", "RTY", NOW + 50, attempt=10)
    assert after(HOURLY, Outcome("error", error="E"), retries=2, attempt=3) == Placement("S", "DIE")
    assert after("NOW", Outcome("expired"), retries=1) == Placement("T", "EXP", NOW + 5, attempt=2)
    assert after("NOW", Outcome("expired"), retries=1, attempt=2) == Placement("T", "EXP", NOW + 10, attempt=3)
    assert after("NOW", Outcome("expired"), retries=1, attempt=3) == Placement("S", "DIE")  # at least 2 after expiry


def test_place_after_expiry() -> None:
    def expired(schedule: str, now: float = NOW) -> Placement:
        return place_after_run(schedule, Outcome("expired"), now, JobRecord(due=NOW - 100, attempt=3))

    for schedule in ("NOW", f"AT:{NOW - 100:.0f}", "CONTINUE"):  # no retries left: it failed
        assert expired(schedule) == Placement("S", "DIE")
    assert expired(HOURLY) == Placement("T", "EXP", NEXT_HOUR, NEXT_HOUR, 1)
    assert expired("DTSTART:20231114T000000Z RRULE:FREQ=DAILY;COUNT=1") == Placement("S", "EXP")
    assert expired("STOP") == Placement("S", "STP")
    assert expired("garbage") == Placement("S", "BAD")


def test_parse_status_and_script_arg() -> None:
    assert parse_status("ENQ:1700000000") == ("ENQ", 1700000000.0)
    assert parse_status("BAD") == ("BAD", 0.0)
    assert Placement("T", "TML", NOW + 0.5).script_arg == "T,1700000000.5,TML,,,0,0"
    assert Placement("T", "TML", NOW + 0.0004).values[1] == "1700000000"  # to the millisecond
    assert QUEUE.script_arg == "Q,,ENQ,,,0,0"
    assert Placement("Q", "ENQ", due=NOW, attempt=2, coalesced=3).script_arg == "Q,,ENQ,1700000000,2,3,0"


def test_read_schedules_csv_good_file(tmp_path: Path, env: Env) -> None:
    path = tmp_path / "schedules.csv"
    path.write_text(
        "a:A,NOW\n"
        "\n"
        "  b:B , CONTINUE \n"
        'q:B,"0 9 * * 1,3"\n'
        '"c,d:A","DTSTART:20231114T000000Z\nRRULE:FREQ=HOURLY"\n'
    )
    rows = read_schedules_csv(str(path))
    assert rows == [
        ("a:A", "NOW", "", "", "", ""),
        ("b:B", "CONTINUE", "", "", "", ""),
        ("q:B", "0 9 * * 1,3", "", "", "", ""),
        ("c,d:A", "DTSTART:20231114T000000Z\nRRULE:FREQ=HOURLY", "", "", "", ""),
    ]
    assert env.bike.set_many(rows) == []
    assert env.c.hgetall(env.keys.schedules) == {jobid: schedule for jobid, schedule, *_ in rows}
    assert env.queue("A") == ["a:A"]
    assert env.queue("B") == ["b:B"]
    assert env.timeline() == {"q:B": 1_700_038_800.0, "c,d:A": NEXT_HOUR}


def test_read_schedules_csv_quoted_fields(tmp_path: Path) -> None:
    path = tmp_path / "schedules.csv"
    path.write_text('b:B,"0 9 * * 1,3"\n"c,d:A","DTSTART:20231114T000000Z\nRRULE:FREQ=HOURLY"\n')
    assert read_schedules_csv(str(path)) == [
        ("b:B", "0 9 * * 1,3", "", "", "", ""),
        ("c,d:A", "DTSTART:20231114T000000Z\nRRULE:FREQ=HOURLY", "", "", "", ""),
    ]


@pytest.mark.parametrize(
    "text, line",
    [
        ("a:A,NOW\nb:A,NOW,host:x,once,0,{},extra\n", 2),
        ("a:A,NOW\n\njust-an-id\n", 3),
        ('"m:A","DTSTART:20231114T000000Z\nRRULE:FREQ=HOURLY"\n,NOW\n', 3),
    ],
)
def test_malformed_schedules_csv_sets_nothing(tmp_path: Path, env: Env, text: str, line: int) -> None:
    path = tmp_path / "schedules.csv"
    path.write_text(text)
    with pytest.raises(CsvError, match=rf"schedules\.csv:{line}: expected JOBID,SCHEDULE"):
        read_schedules_csv(str(path))
    with pytest.raises(CsvError):
        env.bike.dispatch(str(path))
    assert env.c.hgetall(env.keys.schedules) == {}
    assert env.c.get(env.keys.dispatcher) is None


def test_unreadable_schedules_csv(tmp_path: Path) -> None:
    with pytest.raises(CsvError, match="cannot read"):
        read_schedules_csv(str(tmp_path / "missing.csv"))
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"a:A,\xff\n")
    with pytest.raises(CsvError, match="cannot read"):
        read_schedules_csv(str(path))


def test_set_alike_sets_as_set_does_one_by_one_in_calls_of_many(real: Env, client: redis.Redis, prefix: str) -> None:
    """set_alike sends set.lua calls of up to SET_CHUNK jobs of one queue;
    what they store is what set() stores for each job in turn, in the same
    order in each queue, and each job gets its own result."""
    alone = Env(client, prefix + "-alone")
    jobs = [(f"j{i}:{'AB'[i % 3 == 0]}", {"r": 1 + i % 2} if i % 5 == 0 else None, {"i": i} if i % 7 == 0 else None)
            for i in range(2 * SET_CHUNK + 7)]
    results = real.bike.set_alike([*jobs, ("bad|id:A", None)], "NOW", retries=2)
    assert isinstance(results.pop("bad|id:A"), JobIdError)
    assert results == dict.fromkeys((jobid for jobid, *_ in jobs), "PLACED")
    for jobid, needs, data in jobs:
        alone.bike.set(jobid, "NOW", needs=needs, retries=2, **({"data": data} if data is not None else {}))
    assert real.snapshot("A", "B") == alone.snapshot("A", "B")
    assert len(real.queue("A")) > SET_CHUNK and real.queue("B")
    assert client.hgetall(real.keys.jobs) == client.hgetall(alone.keys.jobs)  # records and trails
    assert client.hgetall(real.keys.data) == client.hgetall(alone.keys.data)


def test_a_bad_value_of_any_job_refuses_the_whole_set_call(real: Env) -> None:
    good = ("g:A", "", "", "0", "")
    for bad in [("b:A", "r=x", "", "0", ""), ("b|x:A", "", "", "0", ""), ("b:A", "", "soon", "0", "")]:
        with pytest.raises(redis.ResponseError, match="BADARG"):
            real.bike._set_jobs("A", "NOW", Placement("Q", ENQ, due=NOW, attempt=1), "0", ("", ""), [good, bad],
                                now=NOW, by="me")
    assert real.c.keys(real.keys.prefix + ":*") == []


def test_unset_many_unsets_as_unset_does_one_by_one_in_calls_of_many(real: Env, client: redis.Redis,
                                                                    prefix: str) -> None:
    """unset_many sends unset.lua calls of up to SET_CHUNK jobs of one queue:
    what it leaves is what unset() leaves for each job in turn, and each job
    gets its own result (a running one 2, an unknown one 0)."""
    alone = Env(client, prefix + "-alone")
    ids = [f"j{i}:{'AB'[i % 3 == 0]}" for i in range(2 * SET_CHUNK + 7)]
    for env in (real, alone):
        env.bike.set("run:A", "NOW")
        assert env.claim() is not None and list(env.leases()) == ["run:A"]
        env.bike.set_alike([(jobid, None) for jobid in ids[:SET_CHUNK]], "NOW")
        env.bike.set_alike([(jobid, None) for jobid in ids[SET_CHUNK:]], "*/5 * * * *")
    results = real.bike.unset_many([*ids, "run:A", "nothing:A"])
    assert results == {**dict.fromkeys(ids, 1), "run:A": 2, "nothing:A": 0}
    assert [alone.bike.unset(jobid) for jobid in [*ids, "run:A", "nothing:A"]] == list(results.values())
    assert real.leases().keys() == alone.leases().keys() == {"run:A"}  # each with a token of its own
    assert {**real.snapshot("A", "B"), "leases": {}} == {**alone.snapshot("A", "B"), "leases": {}}
    assert client.hgetall(real.keys.jobs) == client.hgetall(alone.keys.jobs)  # records and trails
