"""The redbike measurements: each function starts the real processes
(``python -m redbike work|dispatch``) against the benchmark's Redis server and
returns a dict of plain numbers (see bench/README.md for what each one means)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import redis

from redbike import Redbike
from redbike.api import who
from redbike.keys import Keys
from redbike.records import TRAIL_SEP, JobRecord, TrailEvent, encode_job, encode_time
from redbike.schedules import parse_schedule
from redbike.scripts import function_library, sources

from .noop import Noop
from .procs import (
    PeakRSS,
    Proc,
    bench_env,
    proc_status,
    redbike_argv,
    wait_for_tally,
    wait_until,
    write_config,
)
from .server import RedisServer, delta, script_usec, snapshot
from .tally import count

PREFIX = "bench"
KEYS = Keys(PREFIX)


class Workspace:
    """A temporary folder with a redbike config for the benchmark server, a
    tally file and a stamps file."""

    def __init__(self, server: RedisServer) -> None:
        self.folder = tempfile.mkdtemp(prefix="redbike-bench-")
        self.config = write_config(self.folder, server.url, PREFIX)
        self.tally = os.path.join(self.folder, "tally")
        self.stamps = os.path.join(self.folder, "stamps")
        self.env = bench_env(BENCH_TALLY=self.tally, BENCH_STAMPS=self.stamps)
        self.procs: list[Proc] = []

    def worker(self, spec: str, concurrency: int = 1) -> Proc:
        proc = Proc(redbike_argv(self.config, "work", spec, "--concurrency", str(concurrency)), self.env,
                    cwd=self.folder, name="redbike-work")
        self.procs.append(proc)
        return proc

    def dispatcher(self) -> Proc:
        proc = Proc(redbike_argv(self.config, "dispatch"), self.env, cwd=self.folder, name="redbike-dispatch")
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.stop() not in (0, None, -15):
                print(f"  note: {proc.name} exited with {proc.process.returncode}:\n{proc.output(1000)}")
            proc.cleanup()
        self.procs = []
        shutil.rmtree(self.folder, ignore_errors=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# -- 1. the limit ------------------------------------------------------------

def limit(server: RedisServer, seconds: float) -> dict[str, Any]:
    """Round trips per second of one unpipelined redis-py client: PING, and
    (for reference) EVALSHA of a script that returns at once."""
    client = server.client()
    client.flushall()

    def rate(call) -> float:
        call()
        done, start = 0, time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(200):
                call()
            done += 200
            now = time.perf_counter()
            if now >= end:
                return done / (now - start)

    ping = rate(client.ping)
    script = client.register_script("return 1")
    evalsha = rate(lambda: script(keys=[], args=[]))
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def raw_ping() -> None:
        sock.sendall(b"PING\r\n")
        if sock.recv(64) != b"+PONG\r\n":
            raise RuntimeError("unexpected PING reply")

    raw = rate(raw_ping)
    sock.close()
    return {"ping_per_s": ping, "evalsha_per_s": evalsha, "raw_ping_per_s": raw, "seconds": seconds}


PROBE_SECONDS = 0.5


def ping_probe(server: RedisServer, seconds: float | None = None) -> float:
    """PINGs per second of one redis-py client, over ``seconds``: taken right
    before and after each throughput figure, which is reported as a fraction
    of their mean (the machine's speed drifts over a run)."""
    seconds = PROBE_SECONDS if seconds is None else seconds
    client = server.client()
    client.ping()
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(100):
            client.ping()
        done += 100
        now = time.perf_counter()
        if now - start >= seconds:
            client.close()
            return done / (now - start)


# -- filling queues and the timeline -----------------------------------------------

def job_id(i: int, queue: str = "A") -> str:
    return f"job{i}:{queue}"


def fill_now(server: RedisServer, n: int, queue: str = "A", batch: int = 1000) -> None:
    """Set n jobs NOW through the API (Redbike.set_alike: set.lua for many jobs per call), pipelined."""
    bike = Redbike(Noop(queue), prefix=PREFIX, client=server.client())
    for start in range(0, n, batch):
        results = bike.set_alike([(job_id(i, queue), None) for i in range(start, min(n, start + batch))], "NOW")
        if any(r != "PLACED" for r in results.values()):
            raise RuntimeError(f"set NOW answered {set(results.values())}")


def load_timeline(server: RedisServer, n: int, due: float, queue: str = "A", batch: int = 10000) -> None:
    """n jobs AT ``due`` in the timeline, written as set.lua writes a job
    whose AT time is still ahead: schedule, status TML, timeline score, job
    record with its trail's set event."""
    client = server.client()
    schedule = parse_schedule(f"AT:{due!r}").text
    now = time.time()
    status = f"TML:{int(now)}"
    due = float(encode_time(due))  # as the scripts are given it
    event = TrailEvent(float(encode_time(now)), "set", {
        "by": who(), "status": "TML", "needs": "", "misfire": "once", "retries": "0", "schedule": schedule})
    record = encode_job(JobRecord(due=due), [event])
    for start in range(0, n, batch):
        ids = [job_id(i, queue) for i in range(start, min(n, start + batch))]
        with client.pipeline(transaction=False) as pipe:
            pipe.hset(KEYS.schedules, mapping={jobid: schedule for jobid in ids})
            pipe.hset(KEYS.statuses, mapping={jobid: status for jobid in ids})
            pipe.zadd(KEYS.timeline, {jobid: due for jobid in ids})
            pipe.hset(KEYS.jobs, mapping={jobid: record for jobid in ids})
            pipe.execute()


def redis_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def key_bytes(client: redis.Redis, n: int) -> dict[str, float]:
    """MEMORY USAGE (every element sampled) of each job-state key, per job."""
    found = {}
    for name in (KEYS.schedules, KEYS.statuses, KEYS.timeline, KEYS.queue("A")):
        used = client.memory_usage(name, samples=0)
        if used:
            found[name.split(":", 1)[1]] = used / n
    return found


def check_layout(server: RedisServer) -> None:
    """The bulk loader writes what Redbike.set writes (checked on one job)."""
    client = server.client()
    client.flushall()
    due = time.time() + 3600
    Redbike(Noop("A"), prefix=PREFIX, client=client).set("probe:A", f"AT:{due!r}")
    real = (client.hget(KEYS.schedules, "probe:A"), client.hget(KEYS.statuses, "probe:A")[:3],
            client.zscore(KEYS.timeline, "probe:A"), _without_times(client.hget(KEYS.jobs, "probe:A")))
    client.flushall()
    load_timeline(server, 1, due)
    jobid = job_id(0)
    loaded = (client.hget(KEYS.schedules, jobid), client.hget(KEYS.statuses, jobid)[:3],
              client.zscore(KEYS.timeline, jobid), _without_times(client.hget(KEYS.jobs, jobid)))
    client.flushall()
    if real != loaded:
        raise RuntimeError(f"bench loader writes {loaded}, Redbike.set writes {real}")


def _without_times(value: str | None) -> list[str]:
    """A job's value in P:jobs: its record, and its trail's events without their times."""
    head, *events = (value or "").split(TRAIL_SEP)
    return [head, *(event.split("|", 1)[1] for event in events)]


# -- 2. worker drain -------------------------------------------------------------

def drain(server: RedisServer, n: int, concurrency: int = 1, window: float = 600.0) -> dict[str, Any]:
    """Fill queue A with n NOW jobs via the API, start ``redbike work`` on it and
    time it from its first finished job to its last (or until ``window`` s
    passed). Counts from INFO over that span; jobs counted by the tally file."""
    client = server.client()
    client.flushall()
    empty = redis_memory(client)
    fill_now(server, n)
    queued = redis_memory(client)
    ping_before = ping_probe(server)
    ws = Workspace(server)
    try:
        proc = ws.worker("bench.noop:Noop('A')", concurrency)
        rss = PeakRSS(proc.pid)
        wait_until(lambda: count(ws.tally) > 0, 60, while_alive=proc, what="the first job")
        before = snapshot(client)
        done0 = count(ws.tally)
        cpu0 = rss.cpu()
        finished, done1 = wait_for_tally(ws.tally, n, before.at + window, proc, rss, 0.1)
        cpu1 = rss.cpu()
        time.sleep(0.1)  # let the last finish() land
        after = snapshot(client)
        rss.sample()
        jobs = done1 - done0
        d = delta(before, after)
        seconds = finished - before.at
        ws.close()
        ping = (ping_before + ping_probe(server)) / 2
        return {
            "ping_per_s": ping, "of_ping": jobs / seconds / ping,
            "jobs": n, "concurrency": concurrency, "measured_jobs": jobs, "drained": done1,
            "seconds": seconds, "jobs_per_s": jobs / seconds,
            "commands_per_job": d.total / jobs, "round_trips_per_job": d.round_trips / jobs,
            "us_per_job": {"wall": seconds / jobs * 1e6, "redis_cpu": d.cpu / jobs * 1e6,
                           "supervisor_cpu": (cpu1[0] - cpu0[0]) / jobs * 1e6,
                           "children_cpu": (cpu1[1] - cpu0[1]) / jobs * 1e6,
                           "redis_script_exec": script_usec(before, after) / jobs},
            "by_command": d.per(jobs),
            "bytes_per_queued_job": (queued - empty) / n,
            "rss_supervisor": rss.main, "rss_child": rss.child,
        }
    finally:
        ws.close()


# -- 3. dispatch, 6. memory and RSS at scale --------------------------------------

def dispatch_and_work(server: RedisServer, n: int, work_window: float) -> dict[str, Any]:
    """n jobs fall due at once: time the dispatcher moving them into their
    queue, its peak RSS, Redis bytes per scheduled and per queued job; then a
    worker drains them (up to ``work_window`` s) for its peak RSS at this size."""
    client = server.client()
    client.flushall()
    empty = redis_memory(client)
    load_timeline(server, n, due=time.time() - 60)
    scheduled = redis_memory(client)
    ws = Workspace(server)
    result: dict[str, Any] = {"jobs": n, "bytes_per_scheduled_job": (scheduled - empty) / n,
                              "key_bytes_per_scheduled_job": key_bytes(client, n)}
    try:
        started = time.monotonic()
        before = snapshot(client)
        polls = 0
        proc = ws.dispatcher()
        rss = PeakRSS(proc.pid)
        leads_at = None
        sampled = time.monotonic()
        while True:  # one round trip a poll: does it lead yet, how many jobs are left
            with client.pipeline(transaction=False) as pipe:
                pipe.pttl(KEYS.dispatcher)
                pipe.zcard(KEYS.timeline)
                ttl, left = pipe.execute()
            polls += 1
            now = time.monotonic()
            if leads_at is None and ttl != -2:
                leads_at = now  # its first step: lead, then move_due
            if left == 0:
                break
            if now - sampled > 0.1:
                rss.sample()
                sampled = now
                if not proc.alive():
                    raise RuntimeError(f"dispatcher exited:\n{proc.output()}")
                if now - started > 600:
                    raise TimeoutError("the dispatcher took over 600 s")
            time.sleep(0.002)
        finished = time.monotonic()
        rss.sample()
        time.sleep(0.05)
        after = snapshot(client)
        d = delta(before, after, extra_reads=polls, sent={"pttl": polls, "zcard": polls})
        seconds = max(finished - (leads_at or finished), 0.002)  # resolution: one poll
        queued = redis_memory(client)
        result["key_bytes_per_queued_job"] = key_bytes(client, n)
        ws.procs.remove(proc)
        proc.stop()
        proc.cleanup()
        result.update({
            "dispatch_seconds": seconds, "dispatch_jobs_per_s": n / seconds,
            "dispatch_wall_seconds": finished - started,
            "dispatch_commands_per_job": d.total / n, "dispatch_round_trips_per_1000": d.round_trips / n * 1000,
            "dispatch_redis_cpu_us_per_job": d.cpu / n * 1e6,
            "dispatch_by_command": d.per(n),
            "bytes_per_queued_job": (queued - empty) / n,
            "rss_dispatcher": rss.main,
        })

        proc = ws.worker("bench.noop:Noop('A')", 1)
        rss = PeakRSS(proc.pid)
        wait_until(lambda: count(ws.tally) > 0, 60, while_alive=proc, what="the first job")
        t0, done0 = time.monotonic(), count(ws.tally)
        t1, done1 = wait_for_tally(ws.tally, n, t0 + work_window, proc, rss, 0.1)
        rss.sample()
        result.update({
            "worker_jobs_done": done1, "worker_jobs_per_s": (done1 - done0) / (t1 - t0),
            "rss_supervisor": rss.main, "rss_child": rss.child,
        })
        return result
    finally:
        ws.close()


# -- 4. latency ------------------------------------------------------------------

def _wait_subscribed(client: redis.Redis, channel: str, n: int, proc: Proc) -> None:
    wait_until(lambda: client.pubsub_numsub(channel)[0][1] >= n, 30, every=0.02, while_alive=proc,
               what=f"{n} subscriber(s) on {channel}")


def _stamps(path: str) -> list[tuple[str, float]]:
    try:
        with open(path) as handle:
            return [(jobid, float(at)) for jobid, at in (line.split() for line in handle if line.strip())]
    except FileNotFoundError:
        return []


def due_to_start(server: RedisServer, rate: float, seconds: float, workers: int = 2) -> dict[str, Any]:
    """Jobs fall due at a steady ``rate`` for ``seconds``: a dispatcher and
    ``workers`` idle worker processes (one slot each) run them. Each job id
    carries its due time; the worker stamps when work() starts."""
    client = server.client()
    client.flushall()
    ws = Workspace(server)
    try:
        dispatcher = ws.dispatcher()
        procs = [ws.worker("bench.noop:Stamp('L')", 1) for _ in range(workers)]
        _wait_subscribed(client, KEYS.queue_channel("L"), workers, procs[0])
        wait_until(lambda: client.get(KEYS.dispatcher), 30, every=0.02, while_alive=dispatcher, what="a leader")
        bike = Redbike(Noop("L"), prefix=PREFIX, client=client)
        total = max(1, int(rate * seconds))
        ahead = 0.5  # each job is set this long before it falls due, so it waits in the timeline
        begin = time.time() + ahead + 0.2
        before = snapshot(client)
        for i in range(total):
            due = begin + i / rate
            pause = due - ahead - time.time()
            if pause > 0:
                time.sleep(pause)
            bike.set(f"d{due!r}-{i}:L", f"AT:{due!r}")
        wait_until(lambda: count(ws.tally) >= total, 30 + seconds, every=0.02, what="every latency job")
        after = snapshot(client)
        latencies = [(at - float(jobid[1:].split("-", 1)[0])) * 1000 for jobid, at in _stamps(ws.stamps)]
        d = delta(before, after)
        return {
            "rate": rate, "seconds": seconds, "workers": workers, "jobs": total, "started": len(latencies),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99), "max_ms": max(latencies),
            "mean_ms": statistics.fmean(latencies),
            "commands_per_job": d.total / total, "round_trips_per_job": (d.round_trips - total) / total,
        }
    finally:
        ws.close()


def pickup(server: RedisServer, jobs: int, gap: float = 0.05) -> dict[str, Any]:
    """A NOW job set while the worker is idle: time from just before set() to
    work() starting, ``jobs`` times, ``gap`` s apart (the worker is idle again
    each time)."""
    client = server.client()
    client.flushall()
    ws = Workspace(server)
    try:
        proc = ws.worker("bench.noop:Stamp('P')", 1)
        _wait_subscribed(client, KEYS.queue_channel("P"), 1, proc)
        time.sleep(0.3)
        bike = Redbike(Noop("P"), prefix=PREFIX, client=client)
        for i in range(jobs):
            time.sleep(gap)
            bike.set(f"p{time.time()!r}-{i}:P", "NOW")
        wait_until(lambda: count(ws.tally) >= jobs, 30, every=0.01, while_alive=proc, what="every pick-up job")
        latencies = [(at - float(jobid[1:].split("-", 1)[0])) * 1000 for jobid, at in _stamps(ws.stamps)]
        return {"jobs": jobs, "started": len(latencies), "p50_ms": percentile(latencies, 50),
                "p99_ms": percentile(latencies, 99), "max_ms": max(latencies)}
    finally:
        ws.close()


# -- 5. idle cost ----------------------------------------------------------------

def idle(server: RedisServer, seconds: float, settle: float = 1.0) -> dict[str, Any]:
    """Commands per second of one idle worker, then of one idle dispatcher,
    each alone on the server, over ``seconds`` after it settled."""
    client = server.client()
    result: dict[str, Any] = {"seconds": seconds}
    for role in ("worker", "dispatcher"):
        client.flushall()
        ws = Workspace(server)
        try:
            if role == "worker":
                proc = ws.worker("bench.noop:Noop('A')", 1)
                _wait_subscribed(client, KEYS.queue_channel("A"), 1, proc)
            else:
                proc = ws.dispatcher()
                wait_until(lambda: client.get(KEYS.dispatcher), 30, every=0.02, while_alive=proc, what="a leader")
            time.sleep(settle)
            before = snapshot(client)
            time.sleep(seconds)
            after = snapshot(client)
            d = delta(before, after)
            result[role] = {"commands_per_s": d.total / d.seconds, "round_trips_per_s": d.round_trips / d.seconds,
                            "script_calls_per_s": (d.commands.get("evalsha", 0) + d.commands.get("fcall", 0)) / d.seconds,
                            "by_command_per_s": d.per(d.seconds), "rss": proc_status(proc.pid).get("VmHWM", 0)}
        finally:
            ws.close()
    return result


# -- heartbeats ----------------------------------------------------------------------

class Monitor:
    """MONITOR on a raw socket: which scripts were called, by SHA1."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.chunks: list[bytes] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopped:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data)

    def stop(self) -> bytes:
        self.stopped = True
        self.sock.close()
        self.thread.join(2)
        return b"".join(self.chunks)


def script_calls_seen() -> dict[bytes, str]:
    """How MONITOR shows a call of each redbike script, lower-cased ('"evalsha"
    "<sha1>"', or '"fcall" "<function>"' for the hot path's on Redis 7+) -> its name."""
    seen = {f'"evalsha" "{hashlib.sha1(source.encode()).hexdigest()}"'.encode(): name
            for name, source in sources().items()}
    seen.update({f'"fcall" "{function}"'.encode(): name for name, function in function_library().functions.items()})
    return seen


def heartbeats(server: RedisServer, long_job: float, short: float = 0.5) -> dict[str, Any]:
    """Script calls (seen by MONITOR) while one worker with two slots runs five
    ``short`` s jobs and, if ``long_job``, one job of that many seconds (still
    shorter than its lease: default timeout 10 s, lease deadline since + 12 s)."""
    client = server.client()
    client.flushall()
    ws = Workspace(server)
    calls_seen = script_calls_seen()
    try:
        proc = ws.worker("bench.noop:Sleepy('H')", 2)
        _wait_subscribed(client, KEYS.queue_channel("H"), 1, proc)
        time.sleep(0.3)
        monitor = Monitor(server.port)
        time.sleep(0.1)
        bike = Redbike(Noop("H"), prefix=PREFIX, client=client)
        jobs = [f"{short:g}-short{i}:H" for i in range(5)]
        if long_job:
            jobs.insert(0, f"{long_job:g}-long:H")
        for jobid in jobs:
            bike.set(jobid, "NOW")
        short_done = len(jobs) - 1 if long_job else len(jobs)
        wait_until(lambda: count(ws.tally) >= short_done, 60, every=0.02, while_alive=proc, what="the short jobs")
        time.sleep(0.2)
        while_short = b"".join(monitor.chunks)  # the long job still runs (it takes > 5 s)
        wait_until(lambda: count(ws.tally) >= len(jobs), 60 + long_job, every=0.02, while_alive=proc,
                   what="the long job")
        time.sleep(0.2)
        seen = monitor.stop()

        def calls(stream: bytes) -> dict[str, int]:
            stream = stream.lower()  # MONITOR shows a command's name as the client spelled it
            found: Counter[str] = Counter()
            for call, name in calls_seen.items():
                found[name] += stream.count(call)
            return {name: n for name, n in found.items() if n}

        return {"short_jobs": 5, "short_seconds": short, "long_job_seconds": long_job,
                "script_calls": calls(seen), "script_calls_while_short": calls(while_short),
                "renew_calls_short": calls(while_short).get("renew", 0), "renew_calls": calls(seen).get("renew", 0)}
    finally:
        ws.close()
