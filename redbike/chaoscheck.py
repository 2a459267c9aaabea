"""The fault campaign's checks (``python -m redbike.chaos``): what the jobs
recorded (``chaosworker.Run``), the faults injected and redbike's state at
the end, against what the README promises. Pure functions of their inputs,
so that a test can feed them a fabricated history and see them object.

What is allowed, from the README:
- a run interrupted by a crash runs again ("Delivery is at least once where
  a crash interrupts a run"): a second completion of an occurrence is
  explained only when the worker of the run it repeats was killed or
  stopped, or Redis restarted, while that run went on (or within
  ``FINISH_SLACK`` after it wrote its end: the finish had not reached Redis);
- two runs of a job overlap only in the zombie case: the earlier run's
  worker was stopped (SIGSTOP) past its lease, and the job started elsewhere.
Everything else found is a violation, one line each.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from redbike.chaosworker import Run

FINISH_SLACK = 2.0  # seconds after a run's end in which its finish may still be in flight
LIVE_STATUSES = ("TML", "ENQ", "WRK", "EXP", "RTY")  # a recurring job in circulation
# A killed worker's slots go on for a moment until its zygote kills them: a
# run they claimed just before may even start (by a few ms) after the kill.
DEATH_LAG = 1.0
NEXT_RUN_LAG = 30.0  # a recurring job's next run may be this late (dispatchers stopped or killed)
NEXT_RUN_AHEAD = 120.0  # and at most this far ahead (the schedules run each minute at least)

KILL_WORKER = "kill-worker"
STOP_WORKER = "stop-worker"
KILL_DISPATCHER = "kill-dispatcher"
STOP_DISPATCHER = "stop-dispatcher"
RESTART_REDIS = "restart-redis"
DROP_CLIENTS = "drop-clients"
FAULT_KINDS = (KILL_WORKER, STOP_WORKER, KILL_DISPATCHER, STOP_DISPATCHER, RESTART_REDIS, DROP_CLIENTS)


@dataclass(frozen=True)
class Fault:
    """A fault from ``start`` to ``end`` (a kill: the same instant) on
    ``target``: a worker's or dispatcher's name (``w1.0``), or ``redis``."""

    kind: str
    target: str
    start: float
    end: float


@dataclass(frozen=True)
class Job:
    """A job of the campaign: ``kind`` oneoff, recurring or continue; its
    status event and next run once settled (before the halt), its ledger
    and whether it was still leased once every process stopped (None: some
    process had to be killed, so a lease may be left to a reaper)."""

    jobid: str
    kind: str
    status: str | None
    next_run: float | None
    fired: int
    last_due: float | None
    leased_after_halt: bool | None = False


@dataclass
class Findings:
    violations: list[str] = field(default_factory=list)
    explained: Counter[str] = field(default_factory=Counter)  # allowed oddities, by why
    cases: list[str] = field(default_factory=list)  # each of them, one line

    def allow(self, why: str, case: str) -> None:
        self.explained[why] += 1
        self.cases.append(f"{case}: {why}")

    @property
    def passed(self) -> bool:
        return not self.violations


def _key(due: float | None) -> float | None:
    return None if due is None else round(due, 3)


def explanation(run: Run, faults: Iterable[Fault], until: float) -> str | None:
    """Why ``run`` may have been cut off between its start and ``until``: the
    kind of fault that hit its worker then (first), else a Redis restart
    then, else None."""
    for fault in faults:
        if (fault.kind in (KILL_WORKER, STOP_WORKER) and fault.target == run.worker
                and fault.start <= until and fault.end >= run.start - DEATH_LAG):
            return fault.kind
    during = [fault for fault in faults if fault.start <= until and fault.end >= run.start]
    return RESTART_REDIS if any(fault.kind == RESTART_REDIS for fault in during) else None


def _stop_of(run: Run, faults: list[Fault], until: float) -> Fault | None:
    """The last SIGSTOP of ``run``'s worker between its start and ``until``."""
    stops = [f for f in faults if f.kind == STOP_WORKER and f.target == run.worker and f.start <= until
             and f.end >= run.start]
    return max(stops, key=lambda f: f.start) if stops else None


def _end_of(run: Run, faults: list[Fault]) -> float:
    """When a run ended: its record, else its worker's kill, else its planned end."""
    if run.end is not None:
        return run.end
    kills = [f.start for f in faults if f.kind == KILL_WORKER and f.target == run.worker and f.start >= run.start]
    return min(kills) if kills else run.start + run.planned


def check_runs(runs: list[Run], faults: list[Fault], findings: Findings) -> None:
    """Runs cut off for no reason, duplicate completions, overlaps."""
    by_job: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.jobid].append(run)
    for jobid, job_runs in sorted(by_job.items()):
        job_runs.sort(key=lambda run: run.start)
        for run in job_runs:
            if run.end is None:
                why = explanation(run, faults, run.start + run.planned + FINISH_SLACK)
                if why is None:
                    findings.violations.append(f"{jobid}: run {run.token} on {run.worker} did not complete "
                                               "and no fault explains it")
                else:
                    findings.allow(f"run cut off ({why})", f"{jobid}: run {run.token} on {run.worker}")
        completed: dict[float | None, list[Run]] = defaultdict(list)
        for run in job_runs:
            if run.end is not None and run.due is not None:
                completed[_key(run.due)].append(run)
        for due, done in completed.items():
            if len(done) < 2:
                continue
            reasons = [explanation(run, faults, (run.end or run.start) + FINISH_SLACK) for run in done]
            if reasons.count(None) > 1:
                findings.violations.append(f"{jobid}: occurrence {due} completed {len(done)} times "
                                           f"({reasons.count(None)} runs with no crash to explain them: "
                                           f"{', '.join(r.token for r, why in zip(done, reasons, strict=True) if why is None)})")
            else:
                repeated = [(run, why) for run, why in zip(done, reasons, strict=True) if why is not None]
                if None not in reasons:  # every run was hit: one of them (say the last) is the one that took
                    repeated.pop()
                for run, why in repeated:
                    findings.allow(f"completed again ({why})",
                                   f"{jobid}: occurrence {due}, run {run.token} on {run.worker}")
        for i, first in enumerate(job_runs):
            end = _end_of(first, faults)
            for later in job_runs[i + 1:]:
                if later.start >= end:
                    break
                stop = _stop_of(first, faults, later.start)
                if stop is not None:
                    # How long the zombie went on once resumed (the README says "a moment at
                    # most"): known only if it wrote its end; a cut-off run's end is not recorded.
                    went_on = (f"went on {first.end - stop.end:.3f} s after SIGCONT" if first.end is not None
                               else "cut off after SIGCONT (its end not recorded)")
                    findings.allow("overlap (zombie: worker stopped past its lease)",
                                   f"{jobid}: run {first.token} on {first.worker} and {later.token} on "
                                   f"{later.worker}; {went_on}")
                else:
                    findings.violations.append(
                        f"{jobid}: runs overlap: {first.token} on {first.worker} ({first.start:.3f} to {end:.3f}) "
                        f"and {later.token} on {later.worker} (from {later.start:.3f})")


def check_jobs(jobs: list[Job], runs: list[Run], checked_at: float, findings: Findings) -> None:
    """One-offs ended and ran, recurring jobs still in circulation, and
    each job's ledger against the occurrences its runs were for."""
    by_job: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.jobid].append(run)
    for job in jobs:
        job_runs = by_job.get(job.jobid, [])
        if job.kind == "oneoff":
            if not any(run.end is not None for run in job_runs):
                findings.violations.append(f"{job.jobid}: one-off lost: no run completed (status {job.status})")
            elif job.status != "END":
                findings.violations.append(f"{job.jobid}: one-off ran but its status is {job.status}, not END")
        elif job.status not in LIVE_STATUSES:
            findings.violations.append(f"{job.jobid}: {job.kind} job out of circulation: status {job.status}")
        elif job.status in ("TML", "EXP", "RTY") and (
                job.next_run is None or not checked_at - NEXT_RUN_LAG <= job.next_run <= checked_at + NEXT_RUN_AHEAD):
            findings.violations.append(f"{job.jobid}: {job.kind} job out of circulation: status {job.status}, "
                                       f"next run {job.next_run} (checked at {checked_at:.3f})")
        if job.leased_after_halt:
            findings.violations.append(f"{job.jobid}: still leased after every process stopped on HALT")
        occurrences = {_key(run.due) for run in job_runs if run.due is not None}
        if job.last_due is not None:
            occurrences.add(_key(job.last_due))
        if job.fired != len(occurrences):
            findings.violations.append(f"{job.jobid}: ledger says {job.fired} occurrence(s) fired, "
                                       f"the runs and the last fired show {len(occurrences)}")


def check_resources(in_use: dict[str, int], findings: Findings) -> None:
    for resource, amount in sorted(in_use.items()):
        if amount:
            findings.violations.append(f"resource {resource}: {amount} still in use at the end")


def check(runs: list[Run], faults: list[Fault], jobs: list[Job], in_use: dict[str, int],
          checked_at: float) -> Findings:
    findings = Findings()
    known = {job.jobid for job in jobs}
    for jobid in sorted({run.jobid for run in runs} - known):
        findings.violations.append(f"{jobid}: ran, but the campaign never set it")
    check_runs(runs, faults, findings)
    check_jobs(jobs, runs, checked_at, findings)
    check_resources(in_use, findings)
    return findings
