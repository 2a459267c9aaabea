"""The fault campaign (redbike.chaos): a short one passes against real
processes, and its checks object to fabricated histories that break each
promise (so a campaign that passes has checked something)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from redbike.api import Redbike
from redbike.chaos import PREFIX, Campaign, dead_leases
from redbike.chaoscheck import KILL_WORKER, RESTART_REDIS, STOP_WORKER, Fault, Job, check
from redbike.chaosworker import RECORDS_VARIABLE, WORKER_VARIABLE, Recorder, Run, read_runs
from redbike.roundrobin import Lease
from redbike.supervisor import pid_of_worker

T = 1_800_000_000.0


def run(jobid: str, token: str, start: float, end: float | None, *, due: float = T, worker: str = "w0.0") -> Run:
    return Run(jobid, token, due, 1, worker, 100, start, 0.5, end)


def oneoff(jobid: str, fired: int = 1, status: str = "END") -> Job:
    return Job(jobid, "oneoff", status, None, fired, T)


def recurring(jobid: str, fired: int, last_due: float, status: str = "TML", next_run: float | None = T + 10) -> Job:
    return Job(jobid, "recurring", status, next_run, fired, last_due)


def violations(runs: list[Run], jobs: list[Job], faults: tuple[Fault, ...] = (),
               in_use: dict[str, int] | None = None) -> list[str]:
    return check(runs, list(faults), jobs, in_use or {}, checked_at=T + 5).violations


def test_a_clean_history_passes() -> None:
    runs = [run("a:a", "t1", T + 0.1, T + 0.5), run("r:a", "t2", T + 1, T + 1.2, due=T + 1),
            run("r:a", "t3", T + 2, T + 2.2, due=T + 2)]
    found = check(runs, [], [oneoff("a:a"), recurring("r:a", 2, T + 2)], {"chaos:db": 0}, checked_at=T + 5)
    assert found.passed, found.violations


def test_a_lost_oneoff_is_reported() -> None:
    assert violations([], [oneoff("a:a", fired=1, status="ENQ")]) == [
        "a:a: one-off lost: no run completed (status ENQ)"]
    # A run that never wrote its end is not a completion either.
    cut = [run("a:a", "t1", T, None)]
    assert any("one-off lost" in line for line in violations(cut, [oneoff("a:a")]))


def test_a_second_completion_needs_a_crash_to_explain_it() -> None:
    twice = [run("a:a", "t1", T, T + 0.5, worker="w0.0"), run("a:a", "t2", T + 10, T + 10.5, worker="w1.0")]
    [line] = violations(twice, [oneoff("a:a")])
    assert line.startswith("a:a: occurrence") and "completed 2 times" in line
    killed = (Fault(KILL_WORKER, "w0.0", T + 0.6, T + 0.6),)  # after its end, before its finish went through
    assert violations(twice, [oneoff("a:a")], killed) == []
    restarted = (Fault(RESTART_REDIS, "redis", T + 0.2, T + 1.5),)
    found = check(twice, list(restarted), [oneoff("a:a")], {}, checked_at=T + 5)
    assert found.passed and found.explained == {"completed again (restart-redis)": 1}
    # A fault on another worker explains nothing.
    assert violations(twice, [oneoff("a:a")], (Fault(KILL_WORKER, "w2.0", T + 0.3, T + 0.3),))


def test_overlapping_runs_are_reported_unless_the_first_was_a_zombie() -> None:
    overlap = [run("r:a", "t1", T, T + 3, due=T, worker="w0.0"),
               run("r:a", "t2", T + 2, T + 2.5, due=T + 2, worker="w1.0")]
    jobs = [recurring("r:a", 2, T + 2)]
    [line] = violations(overlap, jobs)
    assert line.startswith("r:a: runs overlap: t1 on w0.0")
    stopped = (Fault(STOP_WORKER, "w0.0", T + 0.5, T + 2.8),)
    assert violations(overlap, jobs, stopped) == []
    # A run cut off by its worker's kill ends there: no overlap with one after it.
    cut = [run("r:a", "t1", T, None, due=T), run("r:a", "t2", T + 0.3, T + 0.4, due=T + 2, worker="w1.0")]
    assert violations(cut, jobs, (Fault(KILL_WORKER, "w0.0", T + 0.2, T + 0.2),)) == []
    assert any("did not complete and no fault explains it" in line for line in violations(cut, jobs))
    # A slot may start the run it had claimed a moment after its worker was killed (seed 10).
    late = [run("r:a", "t1", T, None, due=T), run("r:a", "t2", T + 7, T + 7.4, due=T, worker="w1.0")]
    assert violations(late, [recurring("r:a", 1, T)], (Fault(KILL_WORKER, "w0.0", T - 0.01, T - 0.01),)) == []
    assert violations(late, [recurring("r:a", 1, T)], (Fault(KILL_WORKER, "w0.0", T - 5, T - 5),))


def test_a_recurring_job_out_of_circulation_is_reported() -> None:
    runs = [run("r:a", "t1", T, T + 0.2)]
    assert violations(runs, [recurring("r:a", 1, T, status="DIE")]) == [
        "r:a: recurring job out of circulation: status DIE"]
    [line] = violations(runs, [recurring("r:a", 1, T, next_run=None)])
    assert "out of circulation: status TML, next run None" in line
    [line] = violations(runs, [recurring("r:a", 1, T, next_run=T - 3600)])
    assert "next run" in line


def test_an_occurrence_fired_twice_or_fired_and_lost_is_reported() -> None:
    runs = [run("r:a", "t1", T, T + 0.2, due=T)]
    [line] = violations(runs, [recurring("r:a", fired=2, last_due=T)])
    assert line == "r:a: ledger says 2 occurrence(s) fired, the runs and the last fired show 1"
    # The last fired occurrence may still wait in its queue: counted, not run.
    assert violations(runs, [recurring("r:a", fired=2, last_due=T + 1)]) == []


def test_a_lease_left_after_a_clean_halt_is_reported() -> None:
    runs = [run("r:a", "t1", T, T + 0.2)]
    leased = Job("r:a", "recurring", "WRK", None, 1, T, leased_after_halt=True)
    assert violations(runs, [leased]) == ["r:a: still leased after every process stopped on HALT"]
    # Not when a process had to be killed at the end: the lease is the reaper's then.
    assert violations(runs, [Job("r:a", "recurring", "WRK", None, 1, T, leased_after_halt=None)]) == []


def test_a_resource_left_in_use_is_reported() -> None:
    assert violations([], [], in_use={"chaos:db": 1, "other": 0}) == ["resource chaos:db: 1 still in use at the end"]


def test_the_worker_records_its_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RECORDS_VARIABLE, str(tmp_path))
    monkeypatch.setenv(WORKER_VARIABLE, "w3.1")
    worker = Recorder("a")
    worker.lease = Lease("cont-1:a", "tok", "a", "host:1", T, 4.0, due=T - 1, attempt=2)
    assert worker.work("cont-1:a") == 1  # a CONTINUE job backs off a second
    worker.lease = Lease("x/y:a", "tok2", "a", "host:1", T, 4.0)
    assert worker.work("x/y:a") is None
    first, second = sorted(read_runs(str(tmp_path)), key=lambda r: r.jobid)
    assert (first.jobid, first.token, first.due, first.attempt, first.worker) == ("cont-1:a", "tok", T - 1, 2, "w3.1")
    assert first.end is not None and first.start + first.planned <= first.end
    assert (second.jobid, second.due) == ("x/y:a", None)


def test_a_short_campaign_passes(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "redbike.chaos", "--seed", "7", "--duration", "20", "--workers", "2",
                           "--report", str(report)], capture_output=True, text=True, timeout=400, check=False)
    assert done.stdout.splitlines()[0] == "seed 7: replay with --seed 7"
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(report.read_text())
    assert result["passed"] and result["violations"] == []
    assert sum(result["faults"].values()) >= 3 and result["runs_completed"] > 50


def test_bad_arguments_are_one_line() -> None:
    for bad in (["--duration", "0"], ["--shards", "0"], ["--workers", "0"]):
        done = subprocess.run([sys.executable, "-m", "redbike.chaos", *bad], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 2
        assert done.stderr == ("python -m redbike.chaos: --duration must be above 0, --workers at least 1 "
                               "and --shards from 1 to 64\n")


def test_dead_leases_are_those_of_workers_not_running() -> None:
    told = {"a:a": {"lease": {"worker": "vm:100:0"}}, "b:a": {"lease": {"worker": "vm:200:1"}}, "c:a": {},
            "d:a": {"lease": {"unreadable": "bad"}}}
    assert dead_leases(told, {100}) == ["b:a"]
    assert dead_leases(told, {100, 200}) == []


def test_a_worker_ids_pid() -> None:
    assert pid_of_worker("web-1.example:4242:3") == 4242
    assert [pid_of_worker(text) for text in ("", "vm:4242", "vm:x:1", "vm:42:", "vm:42:a")] == [None] * 5


def test_the_halt_waits_until_a_killed_workers_run_is_reaped(tmp_path: Path) -> None:
    """A run of a worker killed just before the campaign settles stays leased
    until a dispatcher reaps it (its lease deadline): the campaign halts the
    dispatchers only after that. It halted at once, and reported the lease
    left behind as a violation (CI, the campaign over four shards)."""
    campaign = Campaign(1, 1.0, 1, tmp_path)
    worker = campaign.workers[0]
    try:
        campaign.redis.start()
        campaign.bike = Redbike(Recorder("a:b"), prefix=PREFIX, client=campaign.redis.client())
        campaign.bike.set("rec-x:a", "FREQ=SECONDLY;INTERVAL=1")
        campaign.jobs["rec-x:a"] = "recurring"
        campaign.start(campaign.dispatchers[0])
        for _ in range(20):  # until the kill leaves the run leased (it may end in the kill's moment)
            campaign.start(worker)
            assert campaign.wait(lambda: "lease" in campaign.status_of("rec-x:a"), 60)
            worker.kill()
            campaign.faults.append(Fault(KILL_WORKER, worker.name, time.time(), time.time()))
            if "lease" in campaign.status_of("rec-x:a"):
                break
        assert campaign.leased_to_the_dead() == ["rec-x:a"]
        found, summary = campaign.settle_and_check()
        assert found == [], (found, summary)
        assert "lease" not in campaign.status_of("rec-x:a")
    finally:
        campaign.cleanup()
