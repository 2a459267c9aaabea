"""Example workers. Run from the repository root:

    redbike set hello:A NOW
    redbike set tick:B 'FREQ=SECONDLY;INTERVAL=5'
    redbike dispatch &
    redbike work "examples.worker:Echo('A:A:B')"
"""

from __future__ import annotations

import logging
import time

from redbike import RoundRobin, StopWork

log = logging.getLogger(__name__)


class Echo(RoundRobin):
    """Logs each job it runs. Jobs whose id starts with 'once' stop after
    their first run; jobs in queue 'slow' take two seconds and may take 60."""

    def timeout(self, queue_name: str) -> float | None:
        return 60 if queue_name == "slow" else None

    def work(self, jobid: str) -> int | None:
        print(f"{time.strftime('%H:%M:%S')} working {jobid} (lease {self.lease.token if self.lease else '-'})", flush=True)
        if self.queue_for(jobid) == "slow":
            time.sleep(2)
        if jobid.startswith("once"):
            raise StopWork("ran once")
        return None


class Poller(RoundRobin):
    """A CONTINUE job that backs off: it returns the seconds to wait before
    its next run (an integer), here 3."""

    def work(self, jobid: str) -> int | None:
        print(f"{time.strftime('%H:%M:%S')} polling {jobid}", flush=True)
        return 3
