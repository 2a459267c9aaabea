"""How busy the machine was with other work while the benchmark ran: all CPU
time the kernel counted (/proc/stat) less the benchmark's own (this process,
the processes it started and waited for, and its redis-server), per section;
and which other processes used the most (/proc/*/stat). A figure measured
while other processes took a core is not this machine's figure: the report
flags it."""

from __future__ import annotations

import os
import time

from .procs import TICK, cpu_seconds


def _processes() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every process."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            found[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
        except (OSError, IndexError, ValueError):
            continue
    return found


def _ours(processes: dict[int, tuple[int, float]], root: int) -> set[int]:
    ours = {root}
    changed = True
    while changed:
        changed = False
        for pid, (parent, _) in processes.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return ours


def _machine() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / TICK, steal / TICK


def _own(extra_pids: list[int]) -> float:
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return own + sum(cpu_seconds(pid) for pid in extra_pids)


class OtherLoad:
    """CPU used by other processes (cores busy, 0..nproc) between start() and
    stop(); ``extra_pids``: live processes of the benchmark it did not start
    as waited-for children (its redis-server)."""

    def __init__(self, extra_pids: list[int] | None = None) -> None:
        self.root = os.getpid()
        self.extra = extra_pids or []
        self.before: dict[int, tuple[int, float]] = {}
        self.at = 0.0
        self.machine = (0.0, 0.0)
        self.own = 0.0

    def start(self) -> None:
        self.before = _processes()
        self.machine = _machine()
        self.own = _own(self.extra)
        self.at = time.monotonic()

    def stop(self) -> dict[str, object]:
        seconds = max(time.monotonic() - self.at, 1e-3)
        busy_now, steal_now = _machine()
        own = _own(self.extra) - self.own
        other = max(busy_now - self.machine[0] - own, 0.0) / seconds
        steal = (steal_now - self.machine[1]) / seconds
        after = _processes()
        ours = _ours(after, self.root) | _ours(self.before, self.root) | set(self.extra)
        busy = []
        for pid, (_, cpu) in after.items():
            if pid in ours:
                continue
            used = cpu - self.before.get(pid, (0, 0.0))[1]
            if used > 0.05 * seconds:
                busy.append((used, pid))
        hogs = []
        for used, pid in sorted(busy, reverse=True)[:3]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
            except OSError:
                command = "?"
            hogs.append(f"{used / seconds:.0%} {command}")
        return {"cores": round(other, 2), "steal": round(steal, 2), "top": hogs}


def wait_quiet(limit: float, say=print, threshold: float = 0.1, quiet_for: float = 3.0) -> float:
    """Wait (up to ``limit`` s) until other processes used < ``threshold``
    cores for ``quiet_for`` s in a row; returns the seconds waited."""
    start = time.monotonic()
    told = False
    while time.monotonic() - start < limit:
        load = OtherLoad()
        load.start()
        time.sleep(quiet_for)
        other = load.stop()
        if other["cores"] < threshold and other["steal"] < threshold:
            return time.monotonic() - start
        if not told:
            say(f"waiting for a quiet machine: other processes use {other['cores']:.2f} cores ({'; '.join(other['top'])})")
            told = True
    say(f"the machine did not get quiet within {limit:g} s; measuring anyway")
    return time.monotonic() - start
