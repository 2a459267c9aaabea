"""Running one program for a job (see executors.py): its output read as it
comes, to the log or to files, the end of its stderr kept, its end seen
through a pidfd, and a timeout enforced on its process group: SIGTERM, then
SIGKILL after a grace.

In a pool's slot the program joins the slot's process group, which the
zygote SIGKILLs whenever the slot's child is killed or dies (see zygote.py);
this module signals that group's other members for the executor's own
timeout. Outside a slot the program leads a session of its own, so that
its caller's group is never signalled.
"""

from __future__ import annotations

import logging
import math
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from .zygote import in_slot_child

log = logging.getLogger(__name__)

STDERR_TAIL_BYTES = 3072  # the end of stderr kept for a failure's message (see executors.MESSAGE_CHARACTERS)
LINE_BYTES = 4096  # a longer output line is logged in pieces of this size
POLL_SECONDS = 0.05  # how often a timed-out run's process group is looked at
UNSET_POLL_SECONDS = 1.0  # how often a running program's job is looked up (one HEXISTS): unset, it is stopped


def signal_name(signum: int) -> str:
    """``9 (SIGKILL)``, or just the number for a signal without a name."""
    try:
        return f"{signum} ({signal.Signals(signum).name})"
    except ValueError:
        return str(signum)


# -- the processes of a run's group -------------------------------------------------


def _group_members(group: int) -> list[int]:
    """The live processes of process group ``group``, but this one."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                state, _, pgrp = stat.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(pgrp) == group and state not in (b"Z", b"X") and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _signal_members(group: int, signum: int) -> None:
    """Send ``signum`` to each live process of ``group`` but this one. Each
    is opened as a pidfd, then its group checked again: a pid reused by a
    stranger after the look is never signalled."""
    for pid in _group_members(group):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # it ended meanwhile
            continue
        try:
            if os.getpgid(pid) == group:
                signal.pidfd_send_signal(pidfd, signum)
        except OSError:  # it ended meanwhile, or is not ours to signal
            pass
        finally:
            os.close(pidfd)


# -- a program's output ----------------------------------------------------------


class Output:
    """Where one program's stdout and stderr go: to the log, line by line,
    prefixed with the job id (``path`` None), or to the files ``path``.stdout
    and ``path``.stderr. The end of stderr is kept either way."""

    def __init__(self, jobid: str, label: str, path: str | None) -> None:
        self.prefix = f"job {jobid}:" + (f" {label}" if label else "")
        self.path = path
        self.files: list[IO[bytes]] = []
        self.partial = {"stdout": b"", "stderr": b""}
        self.tail = b""

    def targets(self) -> tuple[IO[bytes] | int, IO[bytes] | int]:
        """What Popen's stdout and stderr get."""
        if self.path is None:
            return subprocess.PIPE, subprocess.PIPE
        self.files = [open(f"{self.path}.{name}", "wb") for name in ("stdout", "stderr")]  # noqa: SIM115
        return self.files[0], self.files[1]

    def feed(self, stream: str, data: bytes) -> None:
        """Log the complete lines of ``data`` (the rest waits for more)."""
        if stream == "stderr":
            self.tail = (self.tail + data)[-STDERR_TAIL_BYTES:]
        lines = (self.partial[stream] + data).split(b"\n")
        self.partial[stream] = lines.pop()
        for line in lines:
            self._log(stream, line)
        while len(self.partial[stream]) > LINE_BYTES:
            self._log(stream, self.partial[stream][:LINE_BYTES])
            self.partial[stream] = self.partial[stream][LINE_BYTES:]

    def _log(self, stream: str, line: bytes) -> None:
        for start in range(0, max(len(line), 1), LINE_BYTES):
            text = line[start:start + LINE_BYTES].rstrip(b"\r").decode(errors="replace")
            log.info("%s %s: %s", self.prefix, stream, text)

    def close(self) -> None:
        for stream, rest in self.partial.items():
            if rest:
                self._log(stream, rest)
        for file in self.files:
            file.close()
        if self.path is not None:
            with open(f"{self.path}.stderr", "rb") as stderr:
                stderr.seek(max(0, os.fstat(stderr.fileno()).st_size - STDERR_TAIL_BYTES))
                self.tail = stderr.read(STDERR_TAIL_BYTES)

    def stderr_tail(self) -> tuple[str, str]:
        """The last line of stderr, and its last (at most STDERR_TAIL_BYTES) bytes."""
        text = self.tail.decode(errors="replace").rstrip()
        lines = text.splitlines()
        return (lines[-1].strip()[:300] if lines else ""), text


# -- one program's run -------------------------------------------------------------


@dataclass
class Ended:
    """How a program's run ended: its exit code (-N: killed by signal N) and
    whether the executor's timeout cut it short."""

    code: int
    timed_out: bool = False
    killed: bool = False  # by SIGKILL, when SIGTERM had not ended it within the grace
    unset: bool = False  # its job was unset while it ran: stopped as for a timeout


class CannotStart(Exception):
    """The program could not be started; the message says why, in a few words."""


def run(argv: list[str], env: dict[str, str], output: Output, deadline: float | None, grace: float,
        still_set: Callable[[], bool] | None = None) -> Ended:
    """Run ``argv`` to its end, its output to ``output``; past ``deadline``
    (time.monotonic), or once ``still_set()`` (asked every UNSET_POLL_SECONDS)
    is False, SIGTERM its process group, SIGKILL it ``grace`` seconds later."""
    in_slot = in_slot_child()
    stdout, stderr = output.targets()
    try:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   start_new_session=not in_slot)
    except OSError as exc:
        output.close()
        reasons = {FileNotFoundError: "no such program", PermissionError: "not executable (permission denied)"}
        raise CannotStart(reasons.get(type(exc)) or exc.strerror or str(exc)) from None
    # In a slot the program is in the slot's group; else it leads its own,
    # whose id it pins until it is reaped (after the last kill: see _Run).
    return _Run(process, output, os.getpgrp() if in_slot else process.pid).wait(deadline, grace, still_set)


class _Run:
    """One program running: its output read as it comes (a selector, so
    neither pipe can fill up and block it), its end seen through a pidfd (a
    background process that keeps the pipes open does not hold the run), its
    timeout enforced on its process group. It is reaped only after the last
    signal to its group."""

    def __init__(self, process: subprocess.Popen[bytes], output: Output, group: int) -> None:
        self.process = process
        self.output = output
        self.group = group
        self.selector = selectors.DefaultSelector()
        self.pidfd = os.pidfd_open(process.pid)
        self.selector.register(self.pidfd, selectors.EVENT_READ, None)
        self.exited = False
        for name, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
            if pipe is not None:
                os.set_blocking(pipe.fileno(), False)
                self.selector.register(pipe, selectors.EVENT_READ, name)

    def wait(self, deadline: float | None, grace: float, still_set: Callable[[], bool] | None = None) -> Ended:
        try:
            stopping = timed_out = unset = killed = False
            kill_at = math.inf
            ask_at = time.monotonic() + UNSET_POLL_SECONDS if still_set is not None else math.inf
            while True:
                now = time.monotonic()
                if now >= ask_at and not stopping:
                    ask_at = now + UNSET_POLL_SECONDS
                    unset = still_set is not None and not self._asks_still_set(still_set)
                if deadline is not None and now >= deadline and not stopping:
                    timed_out = True
                if (timed_out or unset) and not stopping:
                    stopping, kill_at = True, now + grace
                    self._signal(signal.SIGTERM)
                if now >= kill_at:
                    killed = True
                    self._kill()
                    break
                if self.exited and not (stopping and _group_members(self.group)):
                    break
                wake = kill_at if stopping else min(ask_at, deadline if deadline is not None else math.inf)
                if self.exited:
                    wake = min(wake, now + POLL_SECONDS)  # the group's stragglers have until kill_at
                self._read(None if wake == math.inf else max(0.0, wake - now))
            self._drain()
            return Ended(self.process.wait(), timed_out, killed, unset)
        except BaseException:  # interrupted: leave nothing running behind
            self._kill()
            self.process.wait()
            raise
        finally:
            self.selector.close()
            os.close(self.pidfd)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()
            self.output.close()

    @staticmethod
    def _asks_still_set(still_set: Callable[[], bool]) -> bool:
        """still_set(); when Redis cannot say (down, slow), the job is taken
        as still set: an outage stops no program."""
        try:
            return still_set()
        except Exception as exc:  # noqa: BLE001 - any failure to ask is no answer
            log.debug("could not look the running job up: %s", exc)
            return True

    def _read(self, timeout: float | None) -> None:
        for key, _ in self.selector.select(timeout):
            if key.data is None:  # the pidfd: the program ended (a zombie until wait())
                self.selector.unregister(key.fileobj)
                self.exited = True
                continue
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                self.output.feed(key.data, data)
            else:
                self.selector.unregister(key.fileobj)

    def _drain(self) -> None:
        """What is already in the pipes once the program ended; a background
        process that goes on writing is not waited for (its pipe is closed)."""
        for _ in range(64):
            if not any(key.data for key in self.selector.get_map().values()):
                return
            ready = self.selector.select(0)
            if not ready:
                return
            self._read(0)

    def _signal(self, signum: int) -> None:
        # Through the pidfd, also if it left the group (setsid). Not
        # Popen.send_signal: that reaps a zombie first, freeing the group's id.
        signal.pidfd_send_signal(self.pidfd, signum)
        _signal_members(self.group, signum)

    def _kill(self) -> None:
        """SIGKILL the program and its group until none of it is left (a
        process may fork between a look and its kill)."""
        for _ in range(100):
            self._signal(signal.SIGKILL)
            if not _group_members(self.group):
                return
