"""Starting the processes under test, and what /proc says about their memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .tally import count

ROOT = Path(__file__).resolve().parent.parent


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of a process under test: the repository root on
    PYTHONPATH (after what it held), so ``bench.noop`` and the peer task
    modules import."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)])
    env.pop("PYTHONSTARTUP", None)
    env.update(extra)
    return env


class Proc:
    """A process under test; its output goes to a log file, shown if it fails."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None = None, name: str = "") -> None:
        self.name = name or os.path.basename(argv[0])
        # Open for the process's whole life (closed in stop()), not a with-block.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix=f"bench-{self.name}-", suffix=".log", delete=False)
        self.argv = argv
        self.process = subprocess.Popen(argv, env=env, cwd=cwd or str(ROOT), stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self, tail: int = 3000) -> str:
        self.log.flush()
        try:
            return Path(self.log.name).read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM (the graceful stop of every system here), then SIGKILL of the
        whole process group."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # leftovers (forked children)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()
        return self.process.returncode

    def cleanup(self) -> None:
        try:
            os.unlink(self.log.name)
        except OSError:
            pass


def redbike_argv(config: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "redbike", "--config", config, *args]


def write_config(folder: str, url: str, prefix: str = "bench") -> str:
    path = os.path.join(folder, "bench.conf")
    with open(path, "w") as handle:
        handle.write(f"[redbike]\nprefix = {prefix}\ntimefile = {folder}/timefile\n\n[redbike-redis]\nurl = {url}\n")
    return path


# -- memory -------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def descendants(pid: int) -> list[int]:
    """Children, their children and so on (a worker's slots are forked by
    its zygote, a child of the supervisor)."""
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                kids += [int(k) for k in handle.read().split()]
    except OSError:
        pass
    return kids + [grandchild for kid in kids for grandchild in descendants(kid)]


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not of its children), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


class PeakRSS:
    """Peak RSS of a process and of each of its descendants, read from /proc
    (VmHWM is the kernel's own peak; descendants are sampled while they live),
    and their CPU seconds."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.main = 0
        self.child = 0

    def sample(self) -> None:
        self.main = max(self.main, proc_status(self.pid).get("VmHWM", 0))
        for kid in descendants(self.pid):
            self.child = max(self.child, proc_status(kid).get("VmHWM", 0))

    def cpu(self) -> tuple[float, float]:
        """CPU seconds of the process, and of its live descendants together."""
        return cpu_seconds(self.pid), sum(cpu_seconds(kid) for kid in descendants(self.pid))


def wait_until(condition: Callable[[], object], timeout: float, every: float = 0.005,
               while_alive: Proc | None = None, what: str = "condition") -> float:
    """Poll until ``condition()`` is true; returns the time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if while_alive is not None and not while_alive.alive():
            raise RuntimeError(f"{while_alive.name} exited while waiting for {what}:\n{while_alive.output()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def wait_for_tally(tally: str, n: int, end_by: float, proc: Proc, rss: PeakRSS, sample_every: float) -> tuple[float, int]:
    """Wait until the tally file counts ``n`` jobs or the monotonic time
    ``end_by`` passes, sampling the worker's RSS (and checking that it lives)
    every ``sample_every`` s. Returns when it stopped and the jobs counted."""
    sampled = time.monotonic()
    while True:
        now = time.monotonic()
        if count(tally) >= n or now > end_by:
            return now, count(tally)
        if now - sampled > sample_every:
            rss.sample()
            sampled = now
            if not proc.alive():
                raise RuntimeError(f"worker exited:\n{proc.output()}")
        time.sleep(0.002)
