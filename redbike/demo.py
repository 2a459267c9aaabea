"""``redbike demo``: a few jobs of each schedule kind, a dispatcher and a pool
of two workers, for a few seconds, on whatever Redis the config names (the
embedded server by default)."""

from __future__ import annotations

import os
import sys
import threading
import time

import redis

from .api import Redbike
from .clients import check_reachable, connect
from .config import Config
from .dispatcher import Dispatcher
from .roundrobin import RoundRobin, StopWork
from .supervisor import WorkerPool

STARTED = time.time()


class DemoWorker(RoundRobin):
    """Prints each job it runs; 'boom' jobs fail, 'countdown' backs off 1 s
    and stops after two seconds."""

    def work(self, jobid: str) -> int | None:
        sys.stdout.write(f"  +{time.time() - STARTED:5.2f}s  ran {jobid}\n")  # one write: no interleaving
        sys.stdout.flush()
        if jobid.startswith("boom"):
            raise RuntimeError("this job always fails (on purpose)")
        if jobid.startswith("countdown"):
            if time.time() - STARTED > 2:
                raise StopWork("done counting")
            return 1
        return None


def run_demo(config: Config, seconds: float = 5.0) -> int:
    seconds = max(seconds, 3.0)  # time for the AT job (2 s) and the countdown to end
    client = connect(config.redis, prefix=config.prefix)
    check_reachable(client)
    try:
        return _demo(client, config, seconds)
    finally:
        if not config.redis:
            # It was started (or found) for the demo and outlives it: say so.
            folder = os.path.dirname(str(client.connection_pool.connection_kwargs["path"]))
            print(
                f"the embedded Redis server in {folder} still runs (it keeps the demo's data); "
                "stop it with 'redbike embedded stop'"
            )


def _demo(client: redis.Redis, config: Config, seconds: float) -> int:
    global STARTED
    bike = Redbike(DemoWorker("A:B"), prefix=f"{config.prefix}-demo", client=client)
    keys = bike.keys
    client.delete(*keys.job_state(), keys.dispatcher_epoch, keys.queue("A"), keys.queue("B"))
    STARTED = time.time()
    jobs = {
        "hello:A": "NOW",
        "boom:A": "NOW",
        "every-second:B": "FREQ=SECONDLY;INTERVAL=1",
        "in-two-seconds:A": f"AT:{STARTED + 2:.0f}",
        "countdown:B": "CONTINUE",
        "every-minute:A": "* * * * *",
    }
    print(f"redbike demo: {len(jobs)} jobs, a dispatcher and 2 workers for {seconds:g}s (prefix {keys.prefix})")
    for jobid, schedule in jobs.items():
        bike.set(jobid, schedule)
        print(f"  set {jobid:<18} {schedule}")
    dispatcher = Dispatcher(client, keys, bike.worker.queue_for)
    pool = WorkerPool(client, keys, bike.worker, concurrency=2)
    threads = [threading.Thread(target=dispatcher.run), threading.Thread(target=pool.run)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(seconds)
    finally:
        bike.control("HALT")
        for thread in threads:
            thread.join()
    print("statuses (jobid,EVENT,timestamp):")
    for jobid, event, stamp in sorted(bike.statuses()):
        print(f"  {jobid},{event},{stamp}")
    error = (bike.tell("boom:A") or {}).get("last_error", {}).get("error")
    print(f"tell boom:A -> last_error: {error}")
    statuses = {jobid: event for jobid, event, _ in bike.statuses()}
    expected = {"hello:A": "END", "boom:A": "DIE", "in-two-seconds:A": "END", "countdown:B": "STP"}
    wrong = {job: statuses.get(job) for job, event in expected.items() if statuses.get(job) != event}
    if wrong:
        print(f"demo FAILED: unexpected statuses {wrong}")
        return 1
    print("demo OK")
    return 0
