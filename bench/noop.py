"""redbike workers for the benchmark (run as ``redbike work "bench.noop:Noop('A')"``)."""

from __future__ import annotations

import time

from redbike import RoundRobin

from .tally import stamp, tally


class Noop(RoundRobin):
    """Does nothing but count the job (bench/tally.py)."""

    def work(self, jobid: str) -> None:
        tally()


class Stamp(RoundRobin):
    """Records when each job starts: ``jobid start-time`` lines in $BENCH_STAMPS.
    Latency job ids carry the time they were due or set (see bench/redbike_bench.py)."""

    def work(self, jobid: str) -> None:
        started = time.time()
        stamp(f"{jobid} {started!r}")
        tally()


class Sleepy(RoundRobin):
    """Sleeps the seconds its job id starts with (``1.5-x:H`` sleeps 1.5 s)."""

    def work(self, jobid: str) -> None:
        time.sleep(float(jobid.split("-", 1)[0]))
        tally()
