"""The pool's process plumbing (redbike/slots.py, redbike/zygote.py): the shared slot board, the
zygote that forks the slots' children, and the lock between them."""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType

import pytest
import redis
from conftest import alive, parent_of

from redbike.records import JobRecord, encode_job
from redbike.roundrobin import Lease
from redbike.slots import LocalLock, Running, SlotBoard
from redbike.zygote import Zygote, fork


def run(jobid: str, token: str = "t0", local: dict[str, int] | None = None, schedule: str = "NOW") -> Running:
    lease = Lease(jobid, token, jobid.rsplit(":", 1)[-1], "host:1:0", 1795392299.576707, 30.0, 1795392290.25, 2)
    return Running(lease, schedule, encode_job(JobRecord(1795392290.25, 2, "skip:30", 3, 5, 1, 0, 2, 1795392280.5)),
                   1795392299.5, local or {})


def uncached(board: SlotBoard) -> SlotBoard:
    """The same shared memory, read by a board that never wrote it (so it
    decodes what is there, as another process would)."""
    other = SlotBoard.__new__(SlotBoard)
    other.slots, other.memory, other._known = board.slots, board.memory, {}
    return other


ODD_IDS = ["plain:A", "a,b=c|d:Q", "ünï cödé: spaced:B", "x" * 5000 + ":L", "=,|:"]


@pytest.mark.parametrize("jobid", ODD_IDS)
def test_a_run_survives_the_board_encoding(jobid: str) -> None:
    board = SlotBoard(2)
    one = run(jobid, "tok1", {"worker:cpu": 3, "worker:ram_gb": 8},
              "DTSTART;TZID=Europe/Paris:20260301T020000\nRRULE:FREQ=DAILY")
    two = run("other:B", "tok2")
    board.write(1, [one, two])
    assert board.runs(0) == []
    fresh = uncached(board)
    assert fresh.runs(1) == [one, two]
    assert fresh.local_held() == {"worker:cpu": 3, "worker:ram_gb": 8}


def test_replace_and_counts() -> None:
    board = SlotBoard(3)
    a, b = run("a:A", "ta", {"worker:cpu": 2}), run("b:A", "tb", {"worker:cpu": 1})
    board.replace(0, None, a)
    board.replace(2, None, b)
    assert board.local_held() == {"worker:cpu": 3}
    c = run("c:A", "tc")
    board.replace(0, a, c)  # a fused finish + claim
    assert board.runs(0) == [c] and board.local_held() == {"worker:cpu": 1}
    board.count_run(0)
    board.count_run(0)
    board.count_run(2)
    assert board.runs_ended() == 3
    assert board.runs(0) == [c]  # counting leaves the record alone
    board.replace(2, b, None)
    assert board.all_runs() == [c]


def test_the_board_is_shared_with_forked_processes() -> None:
    board = SlotBoard(2)
    mine, theirs = socket.socketpair()

    def child() -> None:
        board.write(1, [run("from-child:A", "tc", {"worker:cpu": 4})])
        board.count_run(1)
        theirs.send(b"1" if board.runs(0) == [run("from-parent:A")] and not board.stopping else b"0")
        theirs.recv(1)  # the parent has set the stop flag
        theirs.send(b"1" if board.stopping else b"0")

    board.write(0, [run("from-parent:A")])
    pid = fork(child)
    try:
        assert mine.recv(1) == b"1"
        assert board.runs(1) == [run("from-child:A", "tc", {"worker:cpu": 4})]
        assert board.runs_ended() == 1
        board.stop()
        mine.send(b"x")
        assert mine.recv(1) == b"1"
    finally:
        os.waitpid(pid, 0)


def test_a_reader_never_sees_half_a_record() -> None:
    """A child rewrites one slot as fast as it can with records of two sizes;
    every read here is one of them, whole (the sequence number works)."""
    board = SlotBoard(1)
    short, long = [run("s:A", "t1")], [run("l" * 3000 + ":A", "t2", {"worker:x": 1}), run("m:B", "t3")]
    board.write(0, short)

    def writer() -> None:
        while not board.stopping:
            board.write(0, long)
            board.write(0, short)

    pid = fork(writer)
    reads = {0: 0, 1: 0}
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and min(reads.values()) < 200:
            seen = uncached(board).runs(0)
            assert seen in (short, long)
            reads[seen == long] += 1
    finally:
        board.stop()
        os.waitpid(pid, 0)
    assert min(reads.values()) >= 1, reads  # both records were read while they changed


def read_in_another_process(board: SlotBoard, within: float = 5.0) -> list[Running] | None:
    """What a fresh process reads from slot 0; None if it does not return in time."""
    mine, theirs = socket.socketpair()

    def reader() -> None:
        theirs.sendall("".join(run.encode() for run in uncached(board).runs(0)).encode())
        theirs.close()

    pid = fork(reader)
    theirs.close()
    try:
        if not select.select([mine], [], [], within)[0]:
            return None
        data = b""
        while part := mine.recv(65536):
            data += part
        return Running.decode_all(data.decode())
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mine.close()


def test_a_writer_killed_at_any_step_leaves_a_whole_record() -> None:
    """A slot's process dies at each step of a write in turn (the bug: killed
    between the two sequence writes, it left the sequence odd and every
    reader spun forever). Readers get the old record or the new one, at
    once, and the next writer (the supervisor, for a dead child) goes on."""
    old = [run("old:A", "t1", {"worker:x": 1})]
    new = [run("n" * 3000 + ":A", "t2"), run("m:B", "t3", {"worker:y": 2})]
    steps = 0
    while True:
        steps += 1
        assert steps < 50, "the write never completed"
        board = SlotBoard(1)
        board.write(0, old)

        def killed_mid_write(board: SlotBoard = board, at: int = steps) -> None:
            lines = 0

            def in_write(frame: FrameType, event: str, arg: object) -> Callable[..., object]:
                nonlocal lines
                if event == "line":
                    lines += 1
                    if lines == at:
                        os._exit(7)
                return in_write

            sys.settrace(lambda frame, event, arg: in_write if frame.f_code is SlotBoard.write.__code__ else None)
            board.write(0, new)

        pid = fork(killed_mid_write)
        completed = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        seen = read_in_another_process(board)
        assert seen is not None, f"a reader waits forever on a writer killed at step {steps}"
        assert seen == new if completed else seen in (old, new), steps
        board.write(0, old + new)
        assert read_in_another_process(board) == old + new
        if completed:
            break
    assert steps > 3


def test_exit_codes_are_recorded_as_they_were() -> None:
    board = SlotBoard(2)
    for pid, code in ((4194304, 0), (77, 3), (78, 255), (79, -signal.SIGKILL), (80, None)):
        board.record_exit(1, pid, code)
        started = time.monotonic()
        assert board.exit_code(1, pid, wait=5) == code
        assert time.monotonic() - started < 1  # recorded: no waiting, even when not known
    assert board.exit_code(1, 79, wait=0) is None  # another child ended since
    assert board.exit_code(0, 80, wait=0) is None


def test_the_zygote_forks_children_that_talk_back() -> None:
    def run_slot(slot: int, channel: socket.socket) -> None:
        channel.send(f"slot {slot} pid {os.getpid()}".encode())
        channel.recv(1)  # until the supervisor says

    board = SlotBoard(8)
    zygote = Zygote(run_slot, board.record_exit)
    try:
        children = [zygote.spawn(slot) for slot in (0, 1)]
        for slot, child in enumerate(children):
            notes, ended = child.wait(5)
            assert notes == f"slot {slot} pid {child.pid}".encode() and not ended
            assert parent_of(child.pid) == zygote.pid and parent_of(zygote.pid) == os.getpid()
        first = children[0]
        first.wake()  # ends it
        assert first.wait(5)[1]
        assert board.exit_code(0, first.pid, wait=5) == 0  # reaped by the zygote, which says how it ended
        assert not alive(first.pid)
        second = children[1]
        second.kill()
        assert second.wait(5)[1] and not alive(second.pid)
        assert board.exit_code(1, second.pid, wait=5) == -signal.SIGKILL
        assert board.exit_code(1, 12345, wait=0.01) is None  # another pid: not known

        old = zygote.pid
        os.kill(old, signal.SIGKILL)
        replacement = zygote.spawn(7)  # a new zygote is forked
        assert zygote.pid != old
        assert replacement.wait(5)[0] == f"slot 7 pid {replacement.pid}".encode()
        replacement.wake()
        for child in children + [replacement]:
            child.close()
    finally:
        zygote.close()
    assert not alive(zygote.pid)


def test_children_of_a_dead_zygote_die_with_it() -> None:
    zygote = Zygote(lambda slot, channel: channel.recv(1), SlotBoard(1).record_exit)
    child = zygote.spawn(0)
    try:
        os.kill(zygote.pid, signal.SIGKILL)
        assert child.wait(5)[1]  # PDEATHSIG
    finally:
        child.close()
        zygote.close()


def test_a_lock_held_elsewhere_at_fork_time_does_not_hang_a_child(redis_server) -> None:
    """The bug the zygote fixes: a child forked while another thread held
    redis-py's pool lock froze on its first use of a client. The zygote is
    forked first, so a child forked later is not hurt by the lock held now."""
    client = redis.Redis.from_url(redis_server.url)
    client.ping()

    def run_slot(slot: int, channel: socket.socket) -> None:
        garbage = [redis.Redis(connection_pool=client.connection_pool) for _ in range(10)]
        del garbage
        import gc

        gc.collect()
        channel.send(b"ok" if client.ping() else b"no")

    zygote = Zygote(run_slot, SlotBoard(1).record_exit)
    holder_ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        with client.connection_pool._lock:
            holder_ready.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        holder_ready.wait(5)
        child = zygote.spawn(0)
        try:
            assert select.select([child.channel], [], [], 10)[0], "the child hangs"
            assert child.channel.recv(2) == b"ok"
        finally:
            child.close()
    finally:
        release.set()
        holder.join()
        zygote.close()


def test_the_local_lock_excludes_other_processes_and_dies_with_its_holder() -> None:
    lock = LocalLock()
    mine, theirs = socket.socketpair()

    def holder() -> None:
        with lock:
            theirs.send(b"held")
            time.sleep(60)  # killed while it holds the lock

    pid = fork(holder)
    try:
        assert mine.recv(4) == b"held"
        got = threading.Event()

        def take() -> None:
            with lock:
                got.set()

        taker = threading.Thread(target=take, daemon=True)
        taker.start()
        assert not got.wait(0.3)  # excluded while the other process holds it
        os.kill(pid, signal.SIGKILL)
        assert got.wait(5)  # the kernel let go of it with its holder
        taker.join()
    finally:
        os.waitpid(pid, 0)
        lock.remove()


def test_the_local_lock_leaves_no_file_behind(tmp_path, monkeypatch) -> None:
    """Not while it is used, nor when its holder is killed, nor when the pool
    never removes it (a pool killed, or a test's pool that never ran): the
    suite once left about 200 /tmp/redbike-local-* files."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lock = LocalLock()
    assert os.listdir(tmp_path) == []

    def holder() -> None:
        with lock:
            os.kill(os.getpid(), signal.SIGKILL)

    pid = fork(holder)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == -signal.SIGKILL
    with lock:  # free again, and still a lock
        assert os.listdir(tmp_path) == []


def test_the_local_lock_excludes_the_children_of_one_pool() -> None:
    """The pool's children share the lock's one descriptor through fork
    (from the supervisor, then from the zygote) and still exclude each other:
    each holds it for a moment while bumping a shared count; no two overlap."""
    lock = LocalLock()
    board = SlotBoard(1)  # its done counter is shared memory
    inside = mmap.mmap(-1, 1)

    def bump() -> None:
        for _ in range(200):
            with lock:
                assert inside[0] == 0, "two processes hold the lock at once"
                inside[0] = 1
                board.count_run(0)  # read, then write: lost without the lock
                time.sleep(0)
                inside[0] = 0

    def middle() -> None:  # a zygote-like process that forks the workers
        pids = [fork(bump) for _ in range(3)]
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        os._exit(0 if codes == [0, 0, 0] else 1)

    pid = fork(middle)
    bump()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert board.runs_ended() == 800
    lock.remove()


def test_the_zygote_survives_many_deaths_at_once_and_records_each_exit() -> None:
    """Eight children end together (half exit 3, half are killed by SIGKILL),
    round after round, while a long child runs beside them and the next round
    is spawned as the previous one dies. The zygote records each exit slowly,
    as a loaded host makes it, so deaths land while it handles others. It
    lives on, the long child is never touched, and each death is recorded
    as it was (the bug: a re-entered SIGCHLD handler raised KeyError, the
    zygote died and took the long child with it)."""
    def run_slot(slot: int, channel: socket.socket) -> None:
        message = channel.recv(64)
        if slot == 0:  # the long child: runs until the test ends it
            channel.recv(1)
            return
        # One after another, 1 ms apart: each lands while the last is handled.
        time.sleep(max(0.0, float(message) + slot / 1000 - time.monotonic()))
        if slot % 2:
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)

    dying = range(1, 9)
    board = SlotBoard(len(dying) + 1)

    def record_slowly(slot: int, pid: int, code: int | None) -> None:
        time.sleep(0.002)
        board.record_exit(slot, pid, code)

    zygote = Zygote(run_slot, record_slowly)
    first_zygote = zygote.pid
    long = zygote.spawn(0)
    long.channel.setblocking(True)
    long.channel.send(b"0")
    try:
        children = {slot: zygote.spawn(slot) for slot in dying}
        for _ in range(6):
            at = f"{time.monotonic() + 0.05!r}".encode()
            for child in children.values():
                child.channel.setblocking(True)
                child.channel.send(at)
            ended = children
            children = {slot: zygote.spawn(slot) for slot in dying}  # asked for while those die
            for slot, child in ended.items():
                assert child.wait(10)[1]
                assert board.exit_code(slot, child.pid, wait=10) == (3 if slot % 2 else -signal.SIGKILL)
                child.close()
            assert zygote.pid == first_zygote and alive(zygote.pid)
            assert alive(long.pid) and not long.wait(0)[1]
            assert board.exit_code(0, long.pid, wait=0) is None
        for slot, child in children.items():
            child.kill()
            assert child.wait(10)[1]
            assert board.exit_code(slot, child.pid, wait=10) == -signal.SIGKILL
            child.close()
        long.channel.send(b"x")
        assert long.wait(10)[1]
        assert board.exit_code(0, long.pid, wait=10) == 0
    finally:
        long.close()
        zygote.close()
    assert not alive(zygote.pid)
