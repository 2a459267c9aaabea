"""Bug 11 end to end: a pool's children dying together (7 jobs calling
os._exit(3) at the same instant, beside one long job) against a real Redis.
The long job runs once, undisturbed, and each death is told as it was."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import redis
from conftest import wait_for

from redbike import Redbike, RoundRobin
from redbike.slots import SlotBoard
from redbike.supervisor import WorkerPool

DYING = 7


class DieTogether(RoundRobin):
    """``die-N-AT:A`` exits 3 at wall-clock time AT; ``long-AT:A`` notes its
    start in ``folder`` (set before the pool forks) and runs until AT."""

    folder = Path()

    def timeout(self, queue_name: str) -> float | None:
        return 60

    def work(self, jobid: str) -> None:
        kind, *_, at = jobid.split(":")[0].split("-")
        if kind == "long":
            with open(self.folder / "long-starts", "a") as starts:
                starts.write(f"{os.getpid()}\n")
            time.sleep(max(0.0, float(at) - time.time()))
            return
        time.sleep(max(0.0, float(at) - time.time()))
        os._exit(3)


def test_children_dying_together_leave_the_others_alone(client: redis.Redis, prefix: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # The zygote records each exit a little slowly, as on the loaded host
    # where this was found: deaths then land while it handles the others.
    record_exit = SlotBoard.record_exit

    def record_slowly(board: SlotBoard, slot: int, pid: int, code: int | None) -> None:
        time.sleep(0.002)
        record_exit(board, slot, pid, code)

    monkeypatch.setattr(SlotBoard, "record_exit", record_slowly)
    monkeypatch.setattr(DieTogether, "folder", tmp_path)
    worker = DieTogether("A")
    bike = Redbike(worker, prefix=prefix, client=client)
    pool = WorkerPool(client, bike.keys, worker, concurrency=DYING + 1)
    thread = threading.Thread(target=pool.run)
    thread.start()
    try:
        die_at = time.time() + 3  # the claims are done by then
        bike.set(f"long-{die_at + 3!r}:A", "NOW")
        dying = [f"die-{number}-{die_at!r}:A" for number in range(DYING)]
        for jobid in dying:
            bike.set(jobid, "NOW")
        wait_for(lambda: pool.jobs_done == DYING + 1, timeout=30, what="every run to end")
    finally:
        bike.control()
        thread.join(30)
    assert (tmp_path / "long-starts").read_text().count("\n") == 1  # never killed, never restarted
    for jobid in dying:
        assert bike.tell(jobid)["last_error"]["error"] == "worker process died (exit code 3)"
    long = bike.tell(f"long-{die_at + 3!r}:A")
    assert long["status"].startswith("END:") and "last_error" not in long
