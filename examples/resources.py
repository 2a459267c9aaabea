"""A worker whose jobs need resources, derived from their ids (the 500-host
example of the README). A job id looks like ``scan/db-host-17/db3:batch``:
job kind ``scan``, data host ``db-host-17``, logical database ``db3``,
queue ``batch``. Each run needs one slot of its host, its logical database,
and two of the worker's CPU cores.

    redbike capacity host:db-host-17 2
    redbike set scan/db-host-17/db3:batch NOW
    redbike work "examples.resources:DatabaseScan('batch')" --concurrency 8 --resources cpu_cores=16
"""

from __future__ import annotations

import random
import time

from redbike import RoundRobin


class DatabaseScan(RoundRobin):
    def needs(self, jobid: str) -> dict[str, int] | None:
        parts = jobid.rsplit(":", 1)[0].split("/")
        if len(parts) != 3:
            return None  # not a per-database job: needs nothing
        _kind, host, database = parts
        return {f"host:{host}": 1, f"db:{host}/{database}": 1, "worker:cpu_cores": 2}

    def work(self, jobid: str) -> None:
        started = time.strftime("%H:%M:%S")
        time.sleep(random.uniform(0.5, 1.5))  # stands in for reading the database
        print(f"{started} scanned {jobid}", flush=True)
