"""The worker of the fault campaign (``python -m redbike.chaos``): each run
writes its own record, so the campaign checks what ran from what the jobs
saw, not from what redbike says about them.

A run appends two lines to ``$CHAOS_RECORDS/<job id>`` (opened O_APPEND,
one ``write`` per line, so lines of runs in different processes never
interleave): at its start ``S`` with the lease's token, occurrence (``due``)
and attempt, the campaign's name for its worker process (``$CHAOS_WORKER``),
its pid, the time and how long it means to run; at its end ``E`` with the
token and the time. A run that was killed has no ``E`` line.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from urllib.parse import quote

from redbike.roundrobin import RoundRobin

RECORDS_VARIABLE = "CHAOS_RECORDS"
WORKER_VARIABLE = "CHAOS_WORKER"
CONTINUE_PREFIX = "cont-"  # jobs whose schedule is CONTINUE: backed off a second per run
SEP = "\t"


@dataclass(frozen=True)
class Run:
    """One run as its job recorded it; ``end`` None: it never wrote its end."""

    jobid: str
    token: str
    due: float | None
    attempt: int
    worker: str
    pid: int
    start: float
    planned: float
    end: float | None = None


def record_path(folder: str, jobid: str) -> str:
    return os.path.join(folder, quote(jobid, safe=""))


def _append(path: str, fields: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (SEP.join(fields) + "\n").encode())
    finally:
        os.close(fd)


class Recorder(RoundRobin):
    """Sleeps 0.05 to 0.8 s per run (its token seeds the length), recording
    its start and end."""

    def work(self, jobid: str) -> int | None:
        lease = self.lease
        if lease is None:  # called outside a pool: nothing to record
            return None
        path = record_path(os.environ[RECORDS_VARIABLE], jobid)
        planned = random.Random(lease.token).uniform(0.05, 0.8)
        _append(path, ["S", jobid, lease.token, "" if lease.due is None else repr(lease.due), str(lease.attempt),
                       os.environ.get(WORKER_VARIABLE, "?"), str(os.getpid()), repr(time.time()), repr(planned)])
        time.sleep(planned)
        _append(path, ["E", jobid, lease.token, repr(time.time())])
        return 1 if jobid.startswith(CONTINUE_PREFIX) else None


def read_runs(folder: str) -> list[Run]:
    """Every run recorded in ``folder``, its end filled in where it wrote one."""
    runs: dict[tuple[str, str], Run] = {}
    ends: dict[tuple[str, str], float] = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as lines:
            for line in lines:
                fields = line.rstrip("\n").split(SEP)
                if fields[0] == "S" and len(fields) == 9:
                    jobid, token, due, attempt, worker, pid, start, planned = fields[1:]
                    runs[jobid, token] = Run(jobid, token, float(due) if due else None, int(attempt), worker,
                                             int(pid), float(start), float(planned))
                elif fields[0] == "E" and len(fields) == 4:
                    ends[fields[1], fields[2]] = float(fields[3])
    return [Run(**{**run.__dict__, "end": ends.get(key)}) for key, run in runs.items()]
