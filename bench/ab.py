"""Drain rate of two or more source trees, compared in short alternating rounds.

    git worktree add /tmp/before <commit>
    python -m bench.ab /tmp/before . [--jobs 3000] [--rounds 12] [--concurrency 1,2]

This VM's speed drifts by 20-40% from one half-minute to the next, more than
the effects looked for, so a whole ``python -m bench`` per tree compares
the drifts as much as the trees. Here every tree gets its own redis-server
and its own ``redbike work`` (concurrency 1 and 2, from that tree's code:
PYTHONPATH), all started once; each round then gives each of them, one
after the other (the order turned every round), a batch of NOW jobs and
times its drain. A round takes a few seconds, so the trees meet the same
drift. Per tree and concurrency it reports the median of the rounds (and
their spread) of the drain rate, the Redis CPU and the worker CPU per job,
and each tree's ratio to the first one's (the median of the per-round
ratios).

Each batch is set while the worker's processes are stopped (SIGSTOP), by
a filler process running the tree's own API (set_alike where the tree has
it, else set in a pipeline), then the worker is let go (SIGCONT) and timed
until the tally (bench/tally.py) has counted the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from .procs import (
    ROOT,
    Proc,
    bench_env,
    cpu_seconds,
    descendants,
    redbike_argv,
    wait_until,
    write_config,
)
from .server import RedisServer, delta, script_usec, snapshot
from .tally import count

PREFIX = "bench"

# Run by each tree's Python: reads a count per line on stdin, sets that many
# more NOW jobs of queue A with the tree's own API, answers "ok".
FILLER = """
import sys, redis
from redbike import Redbike, RoundRobin
client = redis.Redis.from_url(sys.argv[1], decode_responses=True)
bike = Redbike(RoundRobin("A"), prefix=sys.argv[2], client=client)
made = 0
for line in sys.stdin:
    ids = [f"j{made + i}:A" for i in range(int(line))]
    made += len(ids)
    for start in range(0, len(ids), 1000):
        batch = ids[start:start + 1000]
        if hasattr(bike, "set_alike"):
            answers = list(bike.set_alike([(jobid, None) for jobid in batch], "NOW").values())
        else:
            with client.pipeline(transaction=False) as pipe:
                piped = Redbike(RoundRobin("A"), prefix=sys.argv[2], client=pipe)
                for jobid in batch:
                    piped.set(jobid, "NOW")
                answers = pipe.execute()
        if any(answer != "PLACED" for answer in answers):
            sys.exit(f"set NOW answered {set(answers)}")
    print("ok", flush=True)
"""


@dataclass
class Subject:
    """One tree at one concurrency: its server, worker and filler."""

    tree: Path
    concurrency: int
    folder: str
    server: RedisServer = field(default_factory=RedisServer)
    rates: list[float] = field(default_factory=list)
    redis_us: list[float] = field(default_factory=list)
    script_us: list[float] = field(default_factory=list)  # Redis's own time in the script calls (commandstats usec)
    worker_us: list[float] = field(default_factory=list)
    commands: list[float] = field(default_factory=list)  # Redis commands per job, the scripts' own
    round_trips: list[float] = field(default_factory=list)  # requests Redis read per job

    def start(self) -> None:
        self.server.start()
        env = bench_env(BENCH_TALLY=self.tally)
        env["PYTHONPATH"] = os.pathsep.join([str(self.tree), str(ROOT)])
        config = write_config(self.folder, self.server.url, PREFIX)
        self.worker = Proc(redbike_argv(config, "work", "bench.noop:Noop('A')", "--concurrency",
                                        str(self.concurrency)), env, cwd=self.folder, name="redbike-work")
        # Run in the folder: ``python -c`` puts the working directory first on
        # sys.path, and from a checkout that would import the checkout's redbike.
        self.filler = subprocess.Popen([sys.executable, "-c", FILLER, self.server.url, PREFIX], env=env,
                                       cwd=self.folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @property
    def tally(self) -> str:
        return os.path.join(self.folder, "tally")

    def processes(self) -> list[int]:
        return [self.worker.pid, *descendants(self.worker.pid)]

    def fill(self, jobs: int) -> None:
        assert self.filler.stdin is not None and self.filler.stdout is not None
        self.filler.stdin.write(f"{jobs}\n")
        self.filler.stdin.flush()
        if self.filler.stdout.readline().strip() != "ok":
            raise RuntimeError(f"the filler of {self.tree} failed")

    def drain(self, jobs: int, timeout: float = 120.0) -> None:
        """Set ``jobs`` jobs with the worker stopped, then time its drain."""
        target = count(self.tally) + jobs
        pids = self.processes()
        client = self.server.client()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            self.fill(jobs)
        finally:
            before = snapshot(client)
            worker_before = sum(cpu_seconds(pid) for pid in pids)
            started = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        finished = wait_until(lambda: count(self.tally) >= target, timeout, every=0.002, while_alive=self.worker,
                              what=f"{self.tree} (concurrency {self.concurrency}) to drain its jobs")
        after = snapshot(client)
        done = delta(before, after)
        self.rates.append(jobs / (finished - started))
        self.commands.append(done.total / jobs)
        self.round_trips.append(done.round_trips / jobs)
        self.redis_us.append(done.cpu / jobs * 1e6)
        self.script_us.append(script_usec(before, after) / jobs)
        self.worker_us.append((sum(cpu_seconds(pid) for pid in pids) - worker_before) / jobs * 1e6)

    def stop(self) -> None:
        if self.filler.stdin is not None:
            self.filler.stdin.close()
        self.filler.wait(10)
        self.worker.stop()
        self.worker.cleanup()
        self.server.stop()


def summary(subjects: list[Subject]) -> list[dict[str, object]]:
    """Per tree and concurrency: the medians, and the medians of the per-round ratios to the first tree."""
    rows: list[dict[str, object]] = []
    for subject in subjects:
        base = next(s for s in subjects if s.concurrency == subject.concurrency)
        rows.append({
            "tree": str(subject.tree), "concurrency": subject.concurrency, "rounds": len(subject.rates),
            "jobs_per_s": statistics.median(subject.rates), "jobs_per_s_range": [min(subject.rates), max(subject.rates)],
            "rate_vs_first": statistics.median(a / b for a, b in zip(subject.rates, base.rates)) - 1,
            "redis_cpu_us": statistics.median(subject.redis_us),
            "redis_cpu_vs_first": statistics.median(a / b for a, b in zip(subject.redis_us, base.redis_us)) - 1,
            "script_us": statistics.median(subject.script_us),
            "script_vs_first": statistics.median(a / b for a, b in zip(subject.script_us, base.script_us)) - 1,
            "worker_cpu_us": statistics.median(subject.worker_us),
            "commands_per_job": statistics.median(subject.commands),
            "round_trips_per_job": statistics.median(subject.round_trips),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (the first is the baseline)")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per batch")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--concurrency", default="1,2", help="comma-separated")
    parser.add_argument("--json", type=Path, help="also write the table's figures here")
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="redbike-ab-")
    subjects = [Subject(tree.resolve(), int(c), os.path.join(folder, f"{n}-{c}"))
                for c in args.concurrency.split(",") for n, tree in enumerate(args.trees)]
    try:
        for subject in subjects:
            os.makedirs(subject.folder)
            subject.start()
        for subject in subjects:
            subject.drain(200)  # warm: the scripts loaded, every slot forked
            for figures in (subject.rates, subject.redis_us, subject.script_us, subject.worker_us, subject.commands,
                            subject.round_trips):
                figures.clear()
        for round_ in range(args.rounds):
            turn = round_ % len(subjects)
            for subject in subjects[turn:] + subjects[:turn]:
                subject.drain(args.jobs)
            print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{s.tree.name}/c{s.concurrency} {s.rates[-1]:,.0f}" for s in subjects), flush=True)
    finally:
        for subject in subjects:
            subject.stop()
        shutil.rmtree(folder, ignore_errors=True)
    rows = summary(subjects)
    print()
    print("| tree | concurrency | jobs/s (median, range) | vs first | Redis CPU us/job | vs first "
          "| script us/job | vs first | worker CPU us/job | commands/job | round trips/job |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        low, high = cast(list[float], row["jobs_per_s_range"])
        print(f"| {row['tree']} | {row['concurrency']} | {row['jobs_per_s']:,.0f} ({low:,.0f}-{high:,.0f}) "
              f"| {row['rate_vs_first']:+.1%} | {row['redis_cpu_us']:.0f} | {row['redis_cpu_vs_first']:+.1%} "
              f"| {row['script_us']:.1f} | {row['script_vs_first']:+.1%} | {row['worker_cpu_us']:.0f} "
              f"| {row['commands_per_job']:.2f} | {row['round_trips_per_job']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
