"""The fault campaign: ``python -m redbike.chaos [--seed N] [--duration S]
[--workers N] [--shards N] [--report PATH]``.

It starts a real redis-server of its own on a loopback port (append-only,
``appendfsync always``), two ``redbike dispatch`` and several ``redbike
work`` processes of the command line, and a load of one-off (``AT``),
``CONTINUE`` and per-second or per-minute recurring jobs, some of them
needing a resource of capacity 2. For ``--duration`` seconds it injects
faults at random (seeded) times: SIGKILL and SIGSTOP/SIGCONT of workers and
dispatchers (killed ones are started again), Redis killed and started again
on its append-only file, and its clients' connections dropped. Then it lets
everything settle, halts, and checks from what the jobs recorded
(``chaosworker``) and redbike's state what ``chaoscheck`` says. Exit 0 when
every check passes, 1 with one line per violation otherwise. With
``--shards N`` the installation has N shards (the jobs that need the
resource share its tag, so its shard).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import redis

from redbike.api import Redbike
from redbike.chaoscheck import (
    DROP_CLIENTS,
    KILL_DISPATCHER,
    KILL_WORKER,
    RESTART_REDIS,
    STOP_DISPATCHER,
    STOP_WORKER,
    Fault,
    Job,
    check,
)
from redbike.chaosprocs import Daemon, RedisProcess, kill_marked
from redbike.chaosworker import CONTINUE_PREFIX, RECORDS_VARIABLE, Recorder, read_runs
from redbike.records import decode_status
from redbike.sharded import ShardedRedbike
from redbike.shards import Shards
from redbike.supervisor import pid_of_worker

PREFIX = "chaos"
RESOURCE = "chaos:db{db}"  # its tag: the shard of the jobs that need it (they carry the tag too)
CAPACITY = 2
SLOTS = 3  # --concurrency of each worker
FAULT_GAP = 2.5  # mean seconds between faults
FAULT_WEIGHTS = {KILL_WORKER: 3, STOP_WORKER: 3, KILL_DISPATCHER: 2, STOP_DISPATCHER: 2, RESTART_REDIS: 1,
                 DROP_CLIENTS: 2}
RECURRING = ["FREQ=SECONDLY;INTERVAL=1", "FREQ=SECONDLY;INTERVAL=2", "FREQ=SECONDLY;INTERVAL=3",
             "FREQ=SECONDLY;INTERVAL=5", "* * * * *", "CRON_TZ=Europe/Berlin * * * * *"]
SETTLE_TIMEOUT = 180.0
REAP_TIMEOUT = 60.0  # a killed worker's run is reaped at its lease deadline (default-timeout 4 + 2 s here)


def dead_leases(told: Mapping[str, Mapping[str, Any]], alive: set[int]) -> list[str]:
    """Of ``told`` (job id -> what tell() says of it), the jobs whose lease
    is held by a worker (``host:pid:slot``) whose pid is not in ``alive``."""
    dead = []
    for jobid, job in told.items():
        pid = pid_of_worker(str(job.get("lease", {}).get("worker", "")))
        if pid is not None and pid not in alive:
            dead.append(jobid)
    return dead


def config_text(folder: Path, port: int, shards: int) -> str:
    return (f"[redbike]\nprefix = {PREFIX}\nshards = {shards}\nworker = redbike.chaosworker:Recorder('a:b')\n"
            f"timefile = {folder / 'timefile'}\ndefault-timeout = 4\n"
            "retry-backoff = 0.5\nretry-backoff-max = 2\n\n"
            f"[redbike-redis]\nurl = redis://127.0.0.1:{port}/0\nsocket_timeout = 5\n")


def load(rng: random.Random, now: float, duration: float) -> list[tuple[str, str, str, str]]:
    """The jobs set at the start, as (jobid, schedule, needs, kind): one-offs
    some past due, the rest spread over the run; CONTINUE and recurring jobs."""
    jobs: list[tuple[str, str, str, str]] = []
    for i in range(max(20, int(duration * 2))):
        at = now - rng.uniform(1, 3600) if rng.random() < 0.25 else now + rng.uniform(0, duration * 0.9)
        needs = RESOURCE if rng.random() < 0.35 else ""
        jobs.append((f"at-{i}{'{db}' if needs else ''}:{rng.choice('ab')}", f"AT:{at:.3f}", needs, "oneoff"))
    for i in range(3):
        jobs.append((f"{CONTINUE_PREFIX}{i}:{'ab'[i % 2]}", "CONTINUE", "", "continue"))
    for i, schedule in enumerate(RECURRING):
        jobs.append((f"rec-{i}:{'ab'[i % 2]}", schedule, "", "recurring"))
    return jobs


class Campaign:
    def __init__(self, seed: int, duration: float, workers: int, folder: Path, shards: int = 1) -> None:
        self.seed, self.duration, self.folder, self.shards = seed, duration, folder, shards
        self.rng = random.Random(seed)
        self.records = folder / "records"
        self.records.mkdir()
        (folder / "logs").mkdir()
        self.redis = RedisProcess(folder / "redis")
        (folder / ".redbike.conf").write_text(config_text(folder, self.redis.port, shards))
        self.marker = f"{os.getpid()}-{seed}"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **{RECORDS_VARIABLE: str(self.records),
                                                               "CHAOS_CAMPAIGN": self.marker})
        self.workers = [Daemon(f"w{i}", ["work", "--concurrency", str(SLOTS)]) for i in range(workers)]
        self.dispatchers = [Daemon(f"d{i}", ["dispatch"]) for i in range(2)]
        self.faults: list[Fault] = []
        self.jobs: dict[str, str] = {}  # jobid -> kind
        self.cli_sets = 0
        self.exits: list[str] = []  # daemons that exited by themselves, and why
        self.bike: Redbike | ShardedRedbike | None = None

    def redbike(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "redbike", *args], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)

    def start(self, daemon: Daemon, extra: tuple[str, ...] = ()) -> None:
        daemon.start(self.folder, self.env, extra)

    def setup(self) -> None:
        self.redis.start()
        client = self.redis.client()
        self.bike = (ShardedRedbike(Recorder("a:b"), Shards.on(client, PREFIX, self.shards)) if self.shards > 1
                     else Redbike(Recorder("a:b"), prefix=PREFIX, client=client))
        done = self.redbike("capacity", RESOURCE, str(CAPACITY))
        if done.returncode:
            raise RuntimeError(f"redbike capacity failed: {done.stderr.strip()}")
        rows = load(self.rng, time.time(), self.duration)
        with open(self.folder / "jobs.csv", "w") as csv:
            for jobid, schedule, needs, kind in rows:
                csv.write(f"{jobid},{schedule},{needs},once,10\n")
                self.jobs[jobid] = kind
        self.start(self.dispatchers[0], ("--schedules", "jobs.csv"))
        # No fault before the load is in: a restarted dispatcher does not load it again.
        if not self.wait(lambda: all(self.status_of(jobid) for jobid in self.jobs), 60):
            raise RuntimeError("the jobs were not all set within 60 s of `redbike dispatch --schedules`")
        self.start(self.dispatchers[1])
        for worker in self.workers:
            self.start(worker)

    def inject(self, now: float, pending: list[tuple[float, Callable[[], None]]]) -> None:
        """One fault now; its SIGCONT goes to ``pending``, a killed daemon is started again by supervise."""
        kind = self.rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()))[0]
        if kind == RESTART_REDIS:
            self.redis.kill()
            time.sleep(self.rng.uniform(0.1, 2.0))
            self.redis.start()
            self.faults.append(Fault(kind, "redis", now, time.time()))
            return
        if kind == DROP_CLIENTS:
            admin = self.redis.client()
            try:
                for kind_of in ("normal", "pubsub"):
                    admin.execute_command("CLIENT", "KILL", "TYPE", kind_of)
            except redis.RedisError:
                pass
            finally:
                admin.close()
            self.faults.append(Fault(kind, "redis", now, now))
            return
        daemons = self.workers if kind in (KILL_WORKER, STOP_WORKER) else self.dispatchers
        candidates = [d for d in daemons if d.running and not d.stopped]
        if not candidates:
            return
        daemon = self.rng.choice(candidates)
        name = daemon.name
        if kind in (KILL_WORKER, KILL_DISPATCHER):
            daemon.kill()
            self.faults.append(Fault(kind, name, now, now))
            daemon.restart_at = now + self.rng.uniform(0.5, 3.0)
        else:
            daemon.stop()
            length = self.rng.uniform(1.0, 10.0)

            def cont() -> None:
                daemon.cont()
                self.faults.append(Fault(kind, name, now, time.time()))
            pending.append((now + length, cont))

    def set_from_cli(self, now: float) -> None:
        """A one-off set with `redbike set` while faults go on (AT a time in
        the next 10 s). Refused while Redis is down, it is set again, with
        the same time, as a user would: that cannot run it twice."""
        jobid = f"cli-{self.cli_sets}:{self.rng.choice('ab')}"
        schedule = f"AT:{now + self.rng.uniform(0, 10):.3f}"
        self.cli_sets += 1
        self.jobs[jobid] = "oneoff"
        for _ in range(30):
            if self.redbike("set", jobid, schedule, "--retries=10").returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"redbike set {jobid} {schedule} failed 30 times")

    def supervise(self, now: float) -> None:
        """Start again what was killed (when due) and what exited by itself
        (a second later, as a service manager would: a daemon started while
        Redis was down exits at once)."""
        for daemon in self.workers + self.dispatchers:
            if daemon.process is None or daemon.running or daemon.stopped:  # not started yet, or fine
                continue
            if daemon.restart_at is None:
                code = daemon.process.returncode if daemon.process else None
                self.exits.append(f"{daemon.name} exited by itself (code {code}): {daemon.last_line()[-200:]}")
                daemon.restart_at = now + 1.0
            elif now >= daemon.restart_at:
                daemon.restart_at = None
                self.start(daemon)

    def run_faults(self) -> None:
        end = time.time() + self.duration
        pending: list[tuple[float, Callable[[], None]]] = []
        next_fault = time.time() + self.rng.expovariate(1 / FAULT_GAP)
        next_set = time.time() + 3
        while time.time() < end or pending or any(d.restart_at for d in self.workers + self.dispatchers):
            now = time.time()
            self.supervise(now)
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                item[1]()
            if now < end and now >= next_fault:
                self.inject(now, pending)
                next_fault = time.time() + self.rng.expovariate(1 / FAULT_GAP)
            if now < end and now >= next_set:
                self.set_from_cli(now)
                next_set = now + self.rng.uniform(2, 8)
            time.sleep(0.05)

    def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.supervise(time.time())
            try:
                if condition():
                    return True
            except redis.RedisError:
                pass
            time.sleep(0.2)
        return False

    def status_of(self, jobid: str) -> dict[str, Any]:
        assert self.bike is not None
        return self.bike.tell(jobid) or {}

    def oneoffs_ended(self) -> bool:
        return all(self.status_of(j).get("event") == "END" for j, k in self.jobs.items() if k == "oneoff")

    def leased_to_the_dead(self) -> list[str]:
        """The jobs leased to a worker process that is not running (killed)."""
        alive = {daemon.process.pid for daemon in self.workers if daemon.running and daemon.process is not None}
        return dead_leases({jobid: self.status_of(jobid) for jobid in self.jobs}, alive)

    def in_use(self) -> dict[str, int]:
        assert self.bike is not None
        return {resource: used for resource, _cap, used, _waiting in self.bike.capacities()}

    def settle_and_check(self) -> tuple[list[str], dict[str, Any]]:
        notes: list[str] = []
        if not self.wait(self.oneoffs_ended, SETTLE_TIMEOUT):
            notes.append(f"not every one-off ended within {SETTLE_TIMEOUT:.0f} s of the last fault")
        # A run of a killed worker stays leased until a dispatcher reaps it
        # (its lease deadline): the HALT must not stop the dispatchers first.
        if not self.wait(lambda: not self.leased_to_the_dead(), REAP_TIMEOUT):
            notes.append(f"runs of killed workers still leased {REAP_TIMEOUT:.0f} s after the one-offs ended")
        if not self.wait(lambda: not any(self.in_use().values()), 30):
            notes.append("resources still in use 30 s after the one-offs ended")
        checked_at = time.time()
        live = {jobid: self.status_of(jobid) for jobid in self.jobs}
        in_use = self.in_use()
        halt = self.redbike("control", "HALT")
        if halt.returncode:
            notes.append(f"redbike control HALT failed: {halt.stderr.strip()}")
        clean_halt = True
        for daemon in self.workers + self.dispatchers:
            if not daemon.wait_exit(60):
                clean_halt = False
                notes.append(f"{daemon.name} did not stop within 60 s of HALT: killed")
                daemon.kill()
                self.faults.append(Fault(KILL_WORKER if daemon in self.workers else KILL_DISPATCHER,
                                         daemon.name, time.time(), time.time()))
        jobs = []
        for jobid, kind in self.jobs.items():
            told, halted = live[jobid], self.status_of(jobid)
            ledger = halted.get("ledger", {})
            status = decode_status(told["status"])[0] if told.get("status") else None
            jobs.append(Job(jobid, kind, status, told.get("next_run"), int(ledger.get("fired", 0)),
                            ledger.get("last_due"), "lease" in halted if clean_halt else None))
        in_use.update({f"{resource} (after the halt)": used for resource, used in self.in_use().items()})
        runs = read_runs(str(self.records))
        findings = check(runs, self.faults, jobs, in_use, checked_at)
        summary = {
            "faults": dict(Counter(fault.kind for fault in self.faults)),
            "jobs": dict(Counter(self.jobs.values())),
            "set_from_cli": self.cli_sets,
            "runs": len(runs),
            "runs_completed": sum(run.end is not None for run in runs),
            "explained": dict(findings.explained),
            "explained_cases": findings.cases,
            "notes": notes,
            "exited_by_themselves": self.exits,
        }
        return findings.violations, summary

    def cleanup(self) -> None:
        for daemon in self.workers + self.dispatchers:
            daemon.cont()
            daemon.kill()
        kill_marked("CHAOS_CAMPAIGN", self.marker)
        self.redis.kill()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """Bad input: one line on stderr, exit 2."""
        self.exit(2, f"{self.prog}: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m redbike.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--duration", type=float, default=100.0, help="seconds of faults (default 100)")
    parser.add_argument("--workers", type=int, default=3, help="redbike work processes (default 3)")
    parser.add_argument("--shards", type=int, default=1, help="the installation's shards (default 1)")
    parser.add_argument("--report", help="write the report (JSON) here")
    parser.add_argument("--keep", action="store_true", help="keep the campaign's folder (logs, records, AOF)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.workers < 1 or not 1 <= args.shards <= 64:
        parser.error("--duration must be above 0, --workers at least 1 and --shards from 1 to 64")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    print(f"seed {seed}: replay with --seed {seed}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix=f"redbike-chaos-{seed}-"))
    campaign = Campaign(seed, args.duration, args.workers, folder, args.shards)
    started = time.time()
    try:
        campaign.setup()
        campaign.run_faults()
        violations, summary = campaign.settle_and_check()
    except (RuntimeError, OSError, redis.RedisError) as exc:  # the campaign itself failed: no verdict
        print(f"seed {seed}: the campaign could not run: {exc} (logs in {folder})", file=sys.stderr)
        return 1
    finally:
        campaign.cleanup()
    report = {"seed": seed, "duration": args.duration, "workers": args.workers, "shards": args.shards,
              "slots_per_worker": SLOTS,
              "elapsed": round(time.time() - started, 1), "folder": str(folder), **summary,
              "violations": violations, "passed": not violations,
              "fault_log": [asdict(fault) for fault in campaign.faults]}
    print(f"faults injected: {json.dumps(summary['faults'], sort_keys=True)}")
    print(f"jobs: {json.dumps(summary['jobs'], sort_keys=True)} (+{summary['set_from_cli']} tried with redbike set);"
          f" runs {summary['runs']}, completed {summary['runs_completed']}")
    print(f"allowed by the README: {json.dumps(summary['explained'], sort_keys=True)}")
    print(f"daemons that exited by themselves (started again): {len(summary['exited_by_themselves'])}")
    for note in summary["notes"]:
        print(f"note: {note}")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    for violation in violations:
        print(f"VIOLATION: {violation}")
    print(f"seed {seed}: {'passed' if not violations else f'{len(violations)} violation(s)'}"
          f" (logs and records in {folder})" if violations or args.keep else f"seed {seed}: passed")
    if not violations and not args.keep:
        subprocess.run(["rm", "-rf", str(folder)], check=False)
    return 1 if violations else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # cleanup runs on SIGTERM too
    sys.exit(main())
