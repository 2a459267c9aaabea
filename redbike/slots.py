"""The memory a worker pool's processes share, and the lock between them.

Each slot of a pool is a child process that claims, runs and finishes its
jobs on its own Redis connection. The supervisor never sits on that path: it
reads what each child runs from a SlotBoard (shared memory, no system call
per job), renews the leases of long jobs, kills a child that overruns its
timeout, and ends the run of a child that died. The processes themselves
are forked by the zygote (see zygote.py).
"""
from __future__ import annotations

import fcntl
import functools
import mmap
import struct
import tempfile
import threading
import time
from dataclasses import dataclass

from .records import JobRecord, decode_job, occurrence_of
from .roundrobin import Lease

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
    record: str  # the job's record as claimed (records.encode_job): the run's occurrence and attempt, its policy
    renewed_at: float
    local_needs: dict[str, int]  # worker-local amounts it holds
    data: str = ""  # its payload as stored (records.decode_data); not on the board: only its slot needs it
    shard: int = 0  # the shard it lives on (shards.py): its lease is renewed and its run ended there

    @functools.cached_property
    def job(self) -> JobRecord:
        """The record, decoded when first needed: a run that ends well needs
        it only for a recurring schedule, so most jobs' paths never decode it."""
        return decode_job(self.record)

    # On the board a run is eleven fields, each ended by NUL (job ids, schedules,
    # queue and resource names hold none): cheaper than JSON on every job's path.
    FIELDS = 11

    def encode(self) -> str:
        lease = self.lease
        # A float's repr is most of the cost: a run as claimed was renewed
        # when it started, so one text serves both times.
        since = repr(lease.since)
        renewed_at = since if self.renewed_at == lease.since else repr(self.renewed_at)
        local = ",".join(f"{name}={amount}" for name, amount in self.local_needs.items()) if self.local_needs else ""
        return (f"{lease.jobid}\0{lease.token}\0{lease.queue}\0{lease.worker}\0{since}\0"
                f"{lease.timeout!r}\0{self.schedule}\0{self.record}\0{renewed_at}\0{local}\0{self.shard}\0")

    @classmethod
    def decode_all(cls, text: str) -> list[Running]:
        fields = text.split("\0")[:-1]
        runs = []
        for at in range(0, len(fields), cls.FIELDS):
            jobid, token, queue, worker, since, timeout, schedule, job, renewed_at, local, shard = \
                fields[at : at + cls.FIELDS]
            needs = {name: int(amount) for name, _, amount in (pair.partition("=") for pair in local.split(",") if pair)}
            lease = Lease(jobid, token, queue, worker, float(since), float(timeout), *occurrence_of(job, float(since)))
            runs.append(cls(lease, schedule, job, float(renewed_at), needs, shard=int(shard)))
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
        data = "".join([run.encode() for run in runs]).encode()
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
