"""The processes of a worker pool, and the memory they share.

Each slot of a pool is a child process that claims, runs and finishes its
jobs on its own Redis connection. The supervisor never sits on that path: it
reads what each child runs from a SlotBoard (shared memory, no system call
per job), renews the leases of long jobs, kills a child that overruns its
timeout, and ends the run of a child that died.

Children are forked by a Zygote, a process forked once from the supervisor
before the supervisor starts any thread. Forking straight from the threaded
supervisor could copy into the child a lock that another thread held at
that instant (redis-py's connection pool lock, a stream's buffer lock), and
the child would wait for it forever.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import gc
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from .records import JobRecord, decode_job, encode_job
from .roundrobin import Lease

log = logging.getLogger(__name__)

RECORD_BYTES = 1 << 20  # per record buffer; only the pages a record touches take memory
# A slot's header, each field one aligned 8-byte word, so that a process
# killed at any instant leaves each one old or new, never half written
# (struct packs a native-sized Q with one memcpy, one store):
# - the sequence of its last published record, whose parity says which of the
#   slot's two buffers holds it;
# - runs ended;
# - the pid and exit code of its last child to end (written by the zygote,
#   which reaps it): pid << 32 | the code as an unsigned 32-bit number.
# The two record buffers follow, each a length and the record.
_WORD = struct.Struct("<Q")
_LENGTH = struct.Struct("<I")
_DONE_AT, _EXIT_AT, _BUFFERS_AT = 8, 16, 64
_SLOT_BYTES = _BUFFERS_AT + 2 * RECORD_BYTES
_UNKNOWN = 1 << 31  # as an exit code: the child could not be waited for
_FLAGS = 64  # bytes before the first slot: byte 0 is the stop flag


@dataclass
class Running:
    """A claimed job, as its slot knows it."""

    lease: Lease
    schedule: str
    job: JobRecord  # the job's record as claimed: the run's occurrence and attempt, its policy
    renewed_at: float
    local_needs: dict[str, int]  # worker-local amounts it holds

    # On the board a run is ten fields, each ended by NUL (job ids, schedules,
    # queue and resource names hold none): cheaper than JSON on every job's path.
    FIELDS = 10

    def encode(self) -> str:
        lease = self.lease
        local = ",".join(f"{name}={amount}" for name, amount in self.local_needs.items())
        return (f"{lease.jobid}\0{lease.token}\0{lease.queue}\0{lease.worker}\0{lease.since!r}\0"
                f"{lease.timeout!r}\0{self.schedule}\0{encode_job(self.job)}\0{self.renewed_at!r}\0{local}\0")

    @classmethod
    def decode_all(cls, text: str) -> list[Running]:
        fields = text.split("\0")[:-1]
        runs = []
        for at in range(0, len(fields), cls.FIELDS):
            jobid, token, queue, worker, since, timeout, schedule, job, renewed_at, local = \
                fields[at : at + cls.FIELDS]
            needs = {name: int(amount) for name, _, amount in (pair.partition("=") for pair in local.split(",") if pair)}
            lease = Lease(jobid, token, queue, worker, float(since), float(timeout))
            runs.append(cls(lease, schedule, decode_job(job), float(renewed_at), needs))
        return runs


class SlotBoard:
    """What each slot runs, and the pool's stop flag, in anonymous shared
    memory that the supervisor's forks (the zygote, the children) inherit.

    A slot's record lists the runs it holds: one at most in a child; more
    only when a test claims several jobs through one pool object. It is
    written only by the process that runs the slot (its child; the supervisor
    once that child is dead) and read by anyone. A write fills the buffer not
    in use and then publishes it with one store of the next sequence number,
    so a writer killed at any instant leaves the last published record whole
    and nobody waits on it. A reader copies the published buffer and keeps
    the copy if the sequence did not move meanwhile: a writer reaches that
    buffer again only after publishing the other one.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.memory = mmap.mmap(-1, _FLAGS + slots * _SLOT_BYTES)
        # The record each slot had at a sequence number, as this process last
        # wrote or read it: a slot's own process then never decodes its record.
        self._known: dict[int, tuple[int, list[Running]]] = {}

    def _base(self, slot: int) -> int:
        return _FLAGS + slot * _SLOT_BYTES

    def _buffer(self, slot: int, sequence: int) -> int:
        return self._base(slot) + _BUFFERS_AT + sequence % 2 * RECORD_BYTES

    @property
    def stopping(self) -> bool:
        return self.memory[0] == 1

    def stop(self) -> None:
        self.memory[0] = 1

    def write(self, slot: int, runs: list[Running]) -> None:
        data = "".join(run.encode() for run in runs).encode()
        if _LENGTH.size + len(data) > RECORD_BYTES:
            # Only a schedule or id of about a megabyte gets here; the job
            # then runs unsupervised and the dispatcher reaps it if it hangs.
            data = b""
        base = self._base(slot)
        sequence = _WORD.unpack_from(self.memory, base)[0] + 1
        at = self._buffer(slot, sequence)
        _LENGTH.pack_into(self.memory, at, len(data))
        self.memory[at + _LENGTH.size : at + _LENGTH.size + len(data)] = data
        _WORD.pack_into(self.memory, base, sequence)
        self._known[slot] = (sequence, list(runs))

    def runs(self, slot: int) -> list[Running]:
        base = self._base(slot)
        while True:
            sequence = _WORD.unpack_from(self.memory, base)[0]
            known = self._known.get(slot)
            if known is not None and known[0] == sequence:
                return list(known[1])
            at = self._buffer(slot, sequence)
            length = min(_LENGTH.unpack_from(self.memory, at)[0], RECORD_BYTES - _LENGTH.size)
            data = self.memory[at + _LENGTH.size : at + _LENGTH.size + length]
            if _WORD.unpack_from(self.memory, base)[0] == sequence:  # else a live writer moved on: again
                runs = Running.decode_all(data.decode())
                self._known[slot] = (sequence, runs)
                return list(runs)

    def replace(self, slot: int, ended: Running | None, claimed: Running | None) -> None:
        """Take ``ended`` off the slot's record and put ``claimed`` on it."""
        if ended is None and claimed is None:
            return
        runs = self.runs(slot)
        if ended is not None:
            runs = [run for run in runs if run.lease.token != ended.lease.token]
        if claimed is not None:
            runs.append(claimed)
        self.write(slot, runs)

    def all_runs(self) -> list[Running]:
        return [run for slot in range(self.slots) for run in self.runs(slot)]

    def count_run(self, slot: int) -> None:
        """One more run ended in ``slot`` (written by the slot's own process)."""
        at = self._base(slot) + _DONE_AT
        _WORD.pack_into(self.memory, at, _WORD.unpack_from(self.memory, at)[0] + 1)

    def record_exit(self, slot: int, pid: int, code: int | None) -> None:
        """Child ``pid`` of ``slot`` ended with ``code`` (-N: killed by
        signal N; None: it could not be waited for, so how is not known)."""
        word = pid << 32 | (_UNKNOWN if code is None else code & 0xFFFFFFFF)
        _WORD.pack_into(self.memory, self._base(slot) + _EXIT_AT, word)

    def exit_code(self, slot: int, pid: int, wait: float = 0.5) -> int | None:
        """How child ``pid`` of ``slot`` ended, once its zygote has reaped it
        (a moment after its pidfd said it ended); None if that is not known
        or not within ``wait``."""
        deadline = time.monotonic() + wait
        while True:
            word = _WORD.unpack_from(self.memory, self._base(slot) + _EXIT_AT)[0]
            if word >> 32 == pid:
                code = word & 0xFFFFFFFF
                return None if code == _UNKNOWN else code - (code >> 31 << 32)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002)

    def runs_ended(self) -> int:
        return sum(_WORD.unpack_from(self.memory, self._base(slot) + _DONE_AT)[0] for slot in range(self.slots))

    def local_held(self) -> dict[str, int]:
        """Worker-local amounts held by the runs of every slot."""
        held: dict[str, int] = {}
        for run in self.all_runs():
            for name, amount in run.local_needs.items():
                held[name] = held.get(name, 0) + amount
        return held


class LocalLock:
    """A lock between the processes of one pool: claims that count
    worker-local resources take it, so two children never spend the same
    free amount. The kernel releases it if its holder dies.

    It is a POSIX record lock (lockf) on a file that has no name (O_TMPFILE,
    or unlinked at once), so nothing is left on disk however the pool ends.
    Its one descriptor reaches the children through fork, which is why the
    lock is not flock: flock belongs to the open file description, which the
    processes would share, so they would not exclude each other. A POSIX
    lock belongs to the process. Its one trap, that closing any descriptor
    of the file drops the process's locks, cannot be sprung: no other
    descriptor of a nameless file exists.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="redbike-local-")  # noqa: SIM115 - as long-lived as the pool
        self._threads = threading.Lock()  # a POSIX lock does not exclude the threads of its process

    def __enter__(self) -> LocalLock:  # noqa: PYI034 - typing.Self needs Python 3.11
        self._threads.acquire()
        try:
            fcntl.lockf(self._file, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        fcntl.lockf(self._file, fcntl.LOCK_UN)
        self._threads.release()

    def remove(self) -> None:
        """Close this process's descriptor of the lock's file (the file
        itself has no name: it goes with its last descriptor)."""
        self._file.close()


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

    def wake(self) -> None:
        try:
            self.channel.send(b"W")
        except OSError:  # full (a wake-up is pending anyway) or the child is gone
            pass

    def kill(self) -> None:
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
    and the other end of the child's channel (SCM_RIGHTS). It reaps its
    children and hands each one's exit code to ``record_exit(slot, pid, code)``
    (and so their CPU time adds up to the supervisor's, as for any child).

    The zygote ends when its request socket closes, which the kernel does
    when the supervisor dies (even by SIGKILL); its children then die with it.
    If it is killed, the next spawn forks a new one (from the threaded
    supervisor: fork() above keeps the collector off, the likeliest trap).
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
        with the status the kernel gave for it."""
        while self.slots:
            try:
                pid, status = os.waitpid(-1, 0 if blocking else os.WNOHANG)
            except ChildProcessError:  # none left that we could wait for: their ends are not known
                for pid, slot in self.slots.items():
                    self.record_exit(slot, pid, None)
                self.slots.clear()
                return
            if not pid:
                return
            if pid in self.slots:
                self.record_exit(self.slots.pop(pid), pid, os.waitstatus_to_exitcode(status))

    def _slot(self, slot: int, requests: socket.socket, mine: socket.socket, theirs: socket.socket,
              wake_up: socket.socket) -> None:
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
