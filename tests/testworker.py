"""The worker the real-process tests run. What a job does depends on its id:
sleep<S>-...  sleeps S seconds; fail-... raises; stop-... raises StopWork;
unset-... raises UnsetJob; backoff-... returns 1; hang-... sleeps an hour;
block-... waits until the test pushes to the list TESTLOG_KEY:release:<job id>;
spawn-... starts two `sleep 1000` (one a shell's background job, one the
shell itself, exec'd), marked with REDBIKE_TEST_MARK=<job id> in their
environment, then sleeps an hour; detach-... starts one such `sleep 1000`
and returns.
Queue T has a 2 s timeout, queue T1 a 1 s one.
Every run appends a JSON record (job, pid, token, start, end) to the list
TESTLOG_KEY on TESTLOG_URL, so tests can check what ran, when, and where."""

from __future__ import annotations

import json
import os
import subprocess
import time

import redis

from redbike import RoundRobin, StopWork, UnsetJob


class Recorder(RoundRobin):
    def __init__(self, queues: str = "A:B") -> None:
        super().__init__(queues)
        self._log: redis.Redis | None = None

    def timeout(self, queue_name: str) -> float | None:
        return {"T": 2, "T1": 1}.get(queue_name)

    def _record(self, **fields: object) -> None:
        url = os.environ.get("TESTLOG_URL")
        if not url:
            return
        if self._log is None:
            if url.startswith("redis+cluster://"):  # REDBIKE_TEST_CLUSTER=1: the tests' cluster
                host, _, port = url.removeprefix("redis+cluster://").split(",")[0].rpartition(":")
                self._log = redis.RedisCluster(host=host, port=int(port))  # type: ignore[assignment]
            else:
                self._log = redis.Redis.from_url(url)
        self._log.rpush(os.environ["TESTLOG_KEY"], json.dumps(fields))

    def _release(self, jobid: str) -> None:
        """Wait (an hour at most) for the test to release this job."""
        self._record(job=jobid, event="blocked", pid=os.getpid(), at=time.time())
        assert self._log is not None
        deadline = time.monotonic() + 3600
        # Short waits: the client's socket times out reads after a few seconds.
        while not self._log.blpop([f"{os.environ['TESTLOG_KEY']}:release:{jobid}"], timeout=1):
            if time.monotonic() > deadline:
                break

    def work(self, jobid: str) -> int | None:
        start = time.time()
        token = self.lease.token if self.lease else None
        payload = {} if self.data is None else {"data": self.data}
        self._record(job=jobid, event="start", pid=os.getpid(), token=token, at=start, **payload)
        try:
            if jobid.startswith("sleep"):
                time.sleep(float(jobid[5:].split("-", 1)[0]))
            elif jobid.startswith("spawn"):
                subprocess.Popen(["sh", "-c", "sleep 1000 & exec sleep 1000"],
                                 env=dict(os.environ, REDBIKE_TEST_MARK=jobid))
                time.sleep(3600)
            elif jobid.startswith("detach"):
                subprocess.Popen(["sleep", "1000"], env=dict(os.environ, REDBIKE_TEST_MARK=jobid))
            elif jobid.startswith("block"):
                self._release(jobid)
            elif jobid.startswith("hang"):
                time.sleep(3600)
            elif jobid.startswith("fail"):
                raise ValueError(f"{jobid} failed on purpose")
            elif jobid.startswith("stop"):
                raise StopWork()
            elif jobid.startswith("unset"):
                raise UnsetJob()
            elif jobid.startswith("backoff"):
                return 1
            return None
        finally:
            self._record(job=jobid, event="end", pid=os.getpid(), token=token, at=time.time())
