"""The processes of the fault campaign (``redbike.chaos``): its own
redis-server on a loopback port, append-only with ``appendfsync always``,
and the ``redbike dispatch`` / ``redbike work`` daemons it kills, stops and
starts again. Linux only (/proc)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from redbike.chaosworker import WORKER_VARIABLE
from redbike.embedded import own_server_binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return parents


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it (a worker's zygote and slots)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def kill_marked(variable: str, value: str) -> None:
    """SIGKILL every process whose environment has ``variable=value``: what
    is left of the daemons (a slot a killed worker left behind)."""
    mark = f"{variable}={value}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if mark in environ.split(b"\0"):
            try:
                os.kill(int(entry), signal.SIGCONT)
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def _signal(pids: list[int], number: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


class Daemon:
    """One ``redbike`` daemon and its restarts: ``w0.0``, then ``w0.1``... (the
    name its jobs record, in ``$CHAOS_WORKER``)."""

    def __init__(self, base: str, args: list[str]) -> None:
        self.base, self.args = base, args
        self.incarnation = -1
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped: list[int] = []  # the pids SIGSTOPped, until SIGCONT
        self.restart_at: float | None = None  # killed: when to start it again
        self.log: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.base}.{self.incarnation}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, folder: Path, env: dict[str, str], extra: tuple[str, ...] = ()) -> None:
        self.incarnation += 1
        self.log = folder / "logs" / f"{self.name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "redbike", *self.args, *extra], cwd=folder,
                                            env={**env, WORKER_VARIABLE: self.name}, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def last_line(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log else []
        return lines[-1] if lines else ""

    def kill(self) -> None:
        if self.running and self.process is not None:
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> None:
        """SIGSTOP the daemon and everything below it, as a frozen machine."""
        if self.running and self.process is not None:
            self.stopped = tree(self.process.pid)
            _signal(self.stopped, signal.SIGSTOP)

    def cont(self) -> None:
        _signal(self.stopped, signal.SIGCONT)
        self.stopped = []

    def wait_exit(self, timeout: float) -> bool:
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True


class RedisProcess:
    """The campaign's redis-server: killed with SIGKILL and started again on
    the same port and append-only file."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=5)

    def start(self, timeout: float = 60.0) -> None:
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                [own_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:  # refused, or still loading its append-only file
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start (see {self.folder}/server.log)")
            time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
