"""The processes of a worker pool: the zygote that forks each slot's child,
and the supervisor's handle on a child (see slots.py for the memory they share).

Children are forked by a Zygote, a process forked once from the supervisor
before the supervisor starts any thread. Forking straight from the threaded
supervisor could copy into the child a lock that another thread held at
that instant (redis-py's connection pool lock, a stream's buffer lock), and
the child would wait for it forever.

Each child leads a process group of its own, which whatever its jobs start
joins (a subprocess, os.system, a shell pipeline: all but what starts a
session or group of its own). A child that is killed or dies takes its
group with it: the zygote, which reaps the children, kills the group first
(see kill_group), so a killed run leaves no process behind.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)

_slot_child: int | None = None  # in a slot's child: its pid (see in_slot_child)


def in_slot_child() -> bool:
    """Whether this process is a pool slot's child, leading the process group
    that the zygote kills when the child is killed or dies (a process it
    forks inherits the variable, not the pid)."""
    return _slot_child is not None and _slot_child == os.getpid()


def die_with_parent() -> None:
    """Ask Linux to kill this process when the thread that forked it ends
    (even by SIGKILL), so no job outlives the supervisor renewing its lease."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def fork(child: Callable[[], None], *, with_parent: bool = True) -> int:
    """Fork; the child runs ``child`` and exits (``with_parent``: and dies
    when this thread ends, see die_with_parent). Garbage collection is off
    across the fork and the child freezes what it inherited: a collection in
    the child could otherwise run the finalizer of an inherited object (a
    redis client) and block on a lock copied in the locked state."""
    parent = os.getpid()
    collecting = gc.isenabled()
    gc.disable()
    try:
        pid = os.fork()
    finally:
        if collecting and os.getpid() == parent:
            gc.enable()
    if pid:
        return pid
    code = 1
    try:
        gc.freeze()
        if collecting:
            gc.enable()
        if with_parent:
            die_with_parent()
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
        child()
        code = 0
    except BaseException:  # noqa: BLE001 - reported, then the process ends
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - nowhere left to report it: the process ends
                pass
        os._exit(code)


def kill_group(leader: int) -> None:
    """SIGKILL every process of the group that child ``leader`` leads.

    Call it only while ``leader`` is an unreaped child of this process
    (alive, or a zombie): a group's id is its leader's pid, and Linux hands
    out no pid that still names a process (a zombie too) or a group or
    session that has any member. So until the leader is reaped, that id can
    only name the group the leader made: never a stranger's. After reaping,
    once the group is empty, a new process could take the id and lead a
    group of its own with it (a shell's job, the next slot's child), and a
    late killpg would hit it; hence the zygote kills a child's group before
    it reaps the child, never after.
    """
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:  # the leader died before making its group, and nobody joined it
        pass
    except PermissionError:  # only processes we may not signal are left (a job ran a setuid program)
        log.warning("process group %d: cannot kill what is left of it (not ours to signal)", leader)


class Child:
    """The supervisor's handle on one slot's process: its pid, a pidfd (to
    wait for and signal it without racing pid reuse), and a socket pair end
    (wake-ups go down, notes come up)."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel
        self.channel.setblocking(False)
        self.closed_by_child = False
        try:
            self.pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # already gone
            self.pidfd = None

    def wait(self, seconds: float) -> tuple[bytes, bool]:
        """Wait up to ``seconds`` for a note or the child's end. Returns the
        notes read and whether the child has ended."""
        if self.pidfd is None:
            return b"", True
        channel = self.channel.fileno()
        waiting = [self.pidfd] if self.closed_by_child else [channel, self.pidfd]
        ready = select.select(waiting, [], [], max(0.0, seconds))[0]
        notes = b""
        if channel in ready:
            try:
                notes = self.channel.recv(4096)
                self.closed_by_child = not notes
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.closed_by_child = True
            if self.closed_by_child:
                # The child closed its end: it is exiting. Its pidfd turns
                # readable a moment later; wait for that, not the socket.
                ready = select.select([self.pidfd], [], [], max(0.0, seconds))[0]
        return notes, self.pidfd in ready

    def wake(self, note: bytes = b"W") -> None:
        """Wake the child (``note``: what for, see shardclaims.wake_note; by default every shard)."""
        try:
            self.channel.send(note)
        except OSError:  # full (a wake-up is pending anyway) or the child is gone
            pass

    def kill(self) -> None:
        """SIGKILL the child; its zygote kills its process group when it
        reaps it (see kill_group: a pidfd does not pin a pid, a zombie does)."""
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.channel.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


_GOODBYE = 0xFFFFFFFF  # asked for as a slot: the pool ends


def _receive(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes, or fewer if the other end closed."""
    data = b""
    while len(data) < size and (part := sock.recv(size - len(data))):
        data += part
    return data


class Zygote:
    """A single-threaded process that forks the children of a pool's slots.

    The supervisor asks for slot N over a socket pair; the zygote forks a
    child that runs ``run_slot(N, channel)`` and passes back the child's pid
    and the other end of the child's channel (SCM_RIGHTS). Each child leads
    a process group of its own. The zygote reaps its children, first killing
    the group of each one that did not exit cleanly (killed, or died: its run
    was cut short), and hands each one's exit code to ``record_exit(slot, pid,
    code)`` (and so their CPU time adds up to the supervisor's, as for any child).

    The zygote ends when its request socket closes, which the kernel does
    when the supervisor dies (even by SIGKILL); it then kills its children
    and their groups. If it is killed itself, its children die with it (the
    parent-death signal) but what their jobs started survives: nothing is
    left to kill their groups safely. The next spawn forks a new zygote (from
    the threaded supervisor: fork() above keeps the collector off, the
    likeliest trap).
    """

    def __init__(self, run_slot: Callable[[int, socket.socket], None],
                 record_exit: Callable[[int, int, int | None], None]) -> None:
        self.run_slot = run_slot
        self.record_exit = record_exit
        self.slots: dict[int, int] = {}  # in the zygote: pid -> slot of each live child
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self.requests, theirs = socket.socketpair()
        # Not tied to the forking thread's life: that need not be the main thread.
        self.pid = fork(lambda: self._serve(theirs), with_parent=False)
        theirs.close()

    def _serve(self, requests: socket.socket) -> None:
        self.requests.close()
        # Signals are the supervisor's to handle (Ctrl-C reaches the whole
        # process group): the zygote lives exactly as long as its socket.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Children are reaped here, in the loop, never in a signal handler: a
        # handler runs between any two bytecodes, so one reaping while another
        # was half-way through its loop lost or invented exits (and a KeyError
        # killed the zygote, and with it every slot's child). The C-level
        # handler only writes to a wake-up socket that the loop selects on;
        # the Python-level one does nothing, and Python retries the calls it
        # interrupts (PEP 475).
        self._wake_ups, wake_up = socket.socketpair()
        for end in (self._wake_ups, wake_up):
            end.setblocking(False)
        signal.set_wakeup_fd(wake_up.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            ready = select.select([requests, self._wake_ups], [], [])[0]
            if self._wake_ups in ready:
                self._drain_wake_ups()
                self._reap()
            if requests not in ready:
                continue
            request = _receive(requests, 4)
            slot = struct.unpack("<I", request)[0] if len(request) == 4 else _GOODBYE
            if slot == _GOODBYE:  # the pool ends (or the supervisor died): collect the children
                self._reap()
                for pid in self.slots:
                    os.kill(pid, signal.SIGKILL)  # none should be left running: never wait on one
                self._reap(blocking=True)
                return
            mine, theirs = socket.socketpair()
            pid = fork(functools.partial(self._slot, slot, requests, mine, theirs, wake_up))
            # The child makes its group first thing; made here too, so that
            # it exists, whichever of the two runs first, before the pid
            # leaves this process (the classic shell race, closed).
            try:
                os.setpgid(pid, pid)
            except OSError:  # the child is a zombie already, or made it: kill_group copes either way
                pass
            self.slots[pid] = slot
            theirs.close()
            socket.send_fds(requests, [struct.pack("<I", pid)], [mine.fileno()])
            mine.close()

    def _drain_wake_ups(self) -> None:
        try:
            while self._wake_ups.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self, blocking: bool = False) -> None:
        """Collect the children that ended (``blocking``: all of them), each
        with the status the kernel gave for it. A child that did not exit
        cleanly (exit code 0 is its loop's end when the pool stops) has its
        process group killed first, while it is still a zombie that holds
        the group's id (see kill_group)."""
        while self.slots:
            try:
                # WNOWAIT: learn who ended and how, but leave it unreaped.
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT | (0 if blocking else os.WNOHANG))
            except ChildProcessError:  # none left that we could wait for: their ends are not known
                for pid, slot in self.slots.items():
                    self.record_exit(slot, pid, None)
                self.slots.clear()
                return
            if ended is None or not ended.si_pid:
                return
            pid = ended.si_pid
            code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status
            if code != 0:
                kill_group(pid)
            os.waitpid(pid, 0)  # a zombie already: at once
            if pid in self.slots:
                self.record_exit(self.slots.pop(pid), pid, code)

    def _slot(self, slot: int, requests: socket.socket, mine: socket.socket, theirs: socket.socket,
              wake_up: socket.socket) -> None:
        # A group of its own before anything else: whatever a job starts
        # joins it, and dies with it (see kill_group). The terminal's signals
        # no longer reach the job: the supervisor's handler acts for it.
        os.setpgid(0, 0)
        global _slot_child
        _slot_child = os.getpid()
        signal.set_wakeup_fd(-1)
        for end in (requests, mine, self._wake_ups, wake_up):
            end.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.run_slot(slot, theirs)

    def _ask(self, slot: int) -> Child | None:
        try:
            self.requests.sendall(struct.pack("<I", slot))
            data, fds, _, _ = socket.recv_fds(self.requests, 4, 1)
        except OSError:
            return None
        if len(data) != 4 or not fds:
            return None
        return Child(struct.unpack("<I", data)[0], socket.socket(fileno=fds[0]))

    def spawn(self, slot: int) -> Child:
        """A new child for ``slot``."""
        with self.lock:
            child = self._ask(slot)
            if child is None:
                log.warning("the zygote (pid %d) is gone; forking a new one", self.pid)
                self.close()
                self._start()
                child = self._ask(slot)
            if child is None:
                raise OSError("the zygote does not answer")
            return child

    def close(self) -> None:
        """End the zygote once the children it forked have ended; it exits
        when its request socket closes."""
        try:
            self.requests.sendall(struct.pack("<I", _GOODBYE))
        except OSError:  # it is gone already
            pass
        self.requests.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
