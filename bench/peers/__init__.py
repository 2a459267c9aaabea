"""Peers: other Redis job queues draining the same no-op jobs from the same
Redis server, one worker process each, side by side with redbike.

Each peer runs with its defaults except: one worker process, its own no-op
task (bench/tally.py), and logging at WARNING (no per-job log lines). A peer
that is not installed or fails is reported as such; the others go on.
Install them with ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..procs import PeakRSS, Proc, bench_env, wait_for_tally, wait_until
from ..server import RedisServer, delta, snapshot
from ..tally import count

BATCH = 1000


def _bin(name: str) -> str:
    """A console script of this Python's environment."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else (shutil.which(name) or name)


# -- enqueueing n no-op jobs, each peer its own fastest public way ---------------

def _enqueue_rq(url: str, n: int) -> None:
    import redis
    from rq import Queue

    from .rq_tasks import noop

    queue = Queue("default", connection=redis.Redis.from_url(url))
    for start in range(0, n, BATCH):
        queue.enqueue_many([Queue.prepare_data(noop, args=(i,)) for i in range(start, min(n, start + BATCH))])


def _enqueue_huey(url: str, n: int) -> None:
    module = importlib.import_module("bench.peers.huey_app")
    for i in range(n):
        module.noop(i)


def _enqueue_celery(url: str, n: int) -> None:
    module = importlib.import_module("bench.peers.celery_app")
    with module.app.producer_or_acquire() as producer:
        for i in range(n):
            module.noop.apply_async((i,), producer=producer)


def _enqueue_dramatiq(url: str, n: int) -> None:
    module = importlib.import_module("bench.peers.dramatiq_app")
    for i in range(n):
        module.noop.send(i)


def _enqueue_arq(url: str, n: int) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings

    async def go() -> None:
        pool = await create_pool(RedisSettings.from_dsn(url))
        try:
            for start in range(0, n, 50):  # 50 at a time: the pool's connections are limited
                await asyncio.gather(*(pool.enqueue_job("noop", i) for i in range(start, min(n, start + 50))))
        finally:
            await pool.aclose()

    asyncio.run(go())


@dataclass
class Peer:
    name: str
    module: str  # the import that must work for the peer to run
    enqueue: Callable[[str, int], None]
    argv: Callable[[str], list[str]]
    how: str  # the worker command, for the report

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.module.split(".")[0])


PEERS = [
    Peer("rq-simple", "rq", _enqueue_rq,
         lambda url: [_bin("rq"), "worker", "--url", url, "-w", "rq.worker.SimpleWorker", "-q", "default"],
         "rq worker -w rq.worker.SimpleWorker -q default"),
    Peer("rq-fork", "rq", _enqueue_rq,
         lambda url: [_bin("rq"), "worker", "--url", url, "-q", "default"],
         "rq worker -q default (forks a work horse per job)"),
    Peer("huey", "huey", _enqueue_huey,
         lambda url: [_bin("huey_consumer"), "bench.peers.huey_app.huey", "-q"],
         "huey_consumer bench.peers.huey_app.huey -q (1 worker thread)"),
    Peer("celery-solo", "celery", _enqueue_celery,
         lambda url: [_bin("celery"), "-A", "bench.peers.celery_app", "worker", "-P", "solo", "-l", "warning"],
         "celery -A bench.peers.celery_app worker -P solo -l warning"),
    Peer("dramatiq", "dramatiq", _enqueue_dramatiq,
         lambda url: [_bin("dramatiq"), "bench.peers.dramatiq_app", "--processes", "1"],
         "dramatiq bench.peers.dramatiq_app --processes 1 (8 threads)"),
    Peer("arq", "arq", _enqueue_arq,
         lambda url: [sys.executable, "-m", "bench.peers.arq_app"],
         "arq WorkerSettings via run_worker (max_jobs 10), logging WARNING"),
]


def by_name(names: str) -> list[Peer]:
    if names in ("all", ""):
        return list(PEERS)
    if names == "none":
        return []
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    unknown = set(wanted) - {peer.name for peer in PEERS}
    if unknown:
        raise SystemExit(f"unknown peer(s) {sorted(unknown)}; known: {[peer.name for peer in PEERS]}")
    return [peer for peer in PEERS if peer.name in wanted]


def run_peer(server: RedisServer, peer: Peer, n: int, window: float, idle_seconds: float) -> dict[str, Any]:
    """Enqueue n no-op jobs, then one worker process drains them (up to
    ``window`` s); Redis bytes per queued job, jobs/s, commands and round
    trips per job, then commands per second once it is idle."""
    try:
        importlib.import_module(peer.module)
    except Exception as exc:  # noqa: BLE001 - not installed, or broken: reported, the others go on
        return {"error": f"not available ({type(exc).__name__}: {exc}); pip install -e '.[bench]'"}
    result: dict[str, Any] = {"jobs": n, "how": peer.how}
    try:
        result["version"] = peer.version()
    except Exception:  # noqa: BLE001, S110 - a version we cannot read is just left out
        pass
    client = server.client()
    client.flushall()
    folder = tempfile.mkdtemp(prefix=f"bench-{peer.name}-")
    tally_path = os.path.join(folder, "tally")
    env = bench_env(BENCH_TALLY=tally_path, BENCH_REDIS_URL=server.url)
    old_url = os.environ.get("BENCH_REDIS_URL")
    os.environ["BENCH_REDIS_URL"] = server.url  # for the task modules imported here to enqueue
    proc = None
    try:
        empty = int(client.info("memory")["used_memory"])
        started = time.monotonic()
        peer.enqueue(server.url, n)
        result["enqueue_seconds"] = time.monotonic() - started
        result["bytes_per_queued_job"] = (int(client.info("memory")["used_memory"]) - empty) / n
        from ..redbike_bench import ping_probe

        ping_before = ping_probe(server)
        proc = Proc(peer.argv(server.url), env, name=peer.name)
        rss = PeakRSS(proc.pid)
        wait_until(lambda: count(tally_path) > 0, 120, while_alive=proc, what=f"{peer.name}'s first job")
        before = snapshot(client)
        done0 = count(tally_path)
        finished, done1 = wait_for_tally(tally_path, n, before.at + window, proc, rss, 0.2)
        time.sleep(0.1)
        after = snapshot(client)
        rss.sample()
        jobs = done1 - done0
        d = delta(before, after)
        result.update({
            "drained": done1, "partial": done1 < n, "measured_jobs": jobs, "seconds": finished - before.at,
            "jobs_per_s": jobs / (finished - before.at),
            "commands_per_job": d.total / jobs, "round_trips_per_job": d.round_trips / jobs,
            "by_command": dict(list(d.per(jobs).items())[:12]),
            "rss_main": rss.main, "rss_child": rss.child,
        })
        proc.stop()
        proc.cleanup()
        result["ping_per_s"] = (ping_before + ping_probe(server)) / 2
        result["of_ping"] = result["jobs_per_s"] / result["ping_per_s"]
        # Idle: a fresh worker on an empty server (a slow peer may not have drained).
        client.flushall()
        proc = Proc(peer.argv(server.url), env, name=peer.name)
        time.sleep(3.0)
        if not proc.alive():
            raise RuntimeError(f"idle worker exited:\n{proc.output()}")
        idle0 = snapshot(client)
        time.sleep(idle_seconds)
        idle1 = snapshot(client)
        d = delta(idle0, idle1)
        result.update({"idle_commands_per_s": d.total / d.seconds, "idle_round_trips_per_s": d.round_trips / d.seconds,
                       "idle_by_command_per_s": d.per(d.seconds)})
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported; the others go on
        result["error"] = f"{type(exc).__name__}: {str(exc).strip()[-600:]}"
    finally:
        if proc is not None:
            proc.stop()
            if "error" in result:
                result["log"] = proc.output(1500)
            proc.cleanup()
        shutil.rmtree(folder, ignore_errors=True)
        if old_url is None:
            os.environ.pop("BENCH_REDIS_URL", None)
        else:
            os.environ["BENCH_REDIS_URL"] = old_url
    return result
