"""A slot's run of work(), in-process against a real Redis server: what a
result of work() makes of the job."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading

import pytest
import redis
from conftest import RedisServer
from test_jobs import NOW, Env, stamp

from redbike import RoundRobin, titles
from redbike.claims import Tokens
from redbike.clients import DEFAULT_SOCKET_TIMEOUT, connect
from redbike.events import Subscriber
from redbike.keys import Keys
from redbike.roundrobin import Lease
from redbike.slot import Slot, run_work
from redbike.supervisor import WorkerPool

A_YEAR = 366 * 86400  # the longest backoff work() may ask for


class Returns(RoundRobin):
    def __init__(self, value: object) -> None:
        super().__init__("A")
        self.value = value

    def work(self, jobid: str) -> int | None:
        return self.value  # type: ignore[return-value]


@pytest.fixture
def env(client: redis.Redis, prefix: str) -> Env:
    return Env(client, prefix)


@pytest.mark.parametrize(("value", "backoff", "logged"), [
    (10**400, A_YEAR, "work() returned an integer of about 400 digits, not a backoff of 0 to 31622400 seconds"),
    (-5, 0, "work() returned -5, not a backoff of 0 to 31622400 seconds; backing off 0 s"),
    (A_YEAR + 1, A_YEAR, "returned 31622401, not a backoff"),
    (7, 7, ""),
])
def test_a_backoff_out_of_range_is_clamped_logged_and_the_job_placed(
        env: Env, value: int, backoff: int, logged: str, caplog: pytest.LogCaptureFixture) -> None:
    env.bike.set("c:A", "CONTINUE")
    pool = env.pool()
    job = env.claim(pool)
    with caplog.at_level(logging.WARNING, "redbike"):
        outcome, trace = run_work(Returns(value), job.lease)
    assert (outcome.kind, outcome.backoff, trace) == ("ok", backoff, "")
    assert logged in caplog.text and (logged or not caplog.text)
    env.at(NOW + 2)
    assert pool.finish(job, outcome, trace, None, "w1") == ("DONE", None)
    if backoff:
        assert env.timeline() == {"c:A": NOW + 2 + backoff} and env.status("c:A") == stamp("TML", NOW + 2)
    else:  # no backoff: straight back into its queue
        assert env.queue("A") == ["c:A"] and env.status("c:A") == stamp("ENQ", NOW + 2)


class AsksTwice(RoundRobin):
    def work(self, jobid: str) -> int | None:
        self.answers = (self.still_set(), self.still_set())
        return None


def test_still_set_asks_the_slot_while_work_runs_and_is_true_outside_a_pool(env: Env) -> None:
    env.bike.set("s:A", "NOW")
    job = env.claim(env.pool())
    worker = AsksTwice("A")
    assert worker.still_set()  # outside a pool
    slot = WorkerPool(env.c, env.keys, worker).claims.slot(0, "w1")
    env.bike.unset("s:A")
    answers = iter([True])
    assert run_work(worker, job.lease, "", lambda: next(answers, slot.still_set("s:A")))[0].kind == "ok"
    assert worker.answers == (True, False)  # the second asked Redis: unset
    assert worker.still_set() and worker.job_probe is None  # the run is over


@pytest.mark.parametrize(("settings", "timeout"), [
    ({}, None),  # the default 30 s: a slot's socket blocks (kernel keepalive and TCP_USER_TIMEOUT watch it)
    ({"socket_timeout": 5}, 5),  # one the user set is kept
])
def test_a_slot_reads_its_connection_without_the_default_timeout(
        redis_server: RedisServer, prefix: str, settings: dict[str, object], timeout: float | None) -> None:
    """A socket timeout makes every send and recv a poll() first: two system
    calls more per job on the hot path (bench: the child's system CPU)."""
    client = connect({"url": redis_server.url, **settings})
    pool = WorkerPool(client, Keys(prefix), RoundRobin("A"))
    mine, theirs = socket.socketpair()
    try:
        slot = Slot(pool.claims, pool.events, pool.outcomes, 0, pool.worker_id(0), theirs)
        assert slot.connection.socket_timeout == timeout
        assert client.connection_pool.connection_kwargs["socket_timeout"] == (timeout or DEFAULT_SOCKET_TIMEOUT)
        slot.connection.connect()
        options = slot.connection._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert options == 30_000
    finally:
        mine.close()
        theirs.close()


def test_run_tokens_are_unique_across_batches_threads_and_a_fork() -> None:
    """Tokens are read from the OS in batches: none is handed out twice, by
    threads taking them at once or by a forked child and its parent."""
    tokens = Tokens()
    taken: list[str] = []
    threads = [threading.Thread(target=lambda: taken.extend(tokens.take() for _ in range(300))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(taken)) == len(taken) == 1200 > 4 * Tokens.BATCH
    assert all(len(token) == 16 and int(token, 16) >= 0 for token in taken)
    tokens.take()  # the parent holds a batch when it forks
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next tokens, to the parent
        os.write(writer, "".join(tokens.take() for _ in range(3)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    theirs = os.read(reader, 100).decode()
    os.close(reader)
    assert len(theirs) == 48
    ours = {tokens.take() for _ in range(3)}
    assert not ours & {theirs[at : at + 16] for at in range(0, 48, 16)}


class FailsJ1(RoundRobin):
    def work(self, jobid: str) -> None:
        if jobid == "j1:A":
            raise ValueError("j1 fails")


class StopsWhenIdle(Subscriber):
    """Records a slot's events, and stops its pool once the slot waits."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.seen: list[str] = []

    def claimed(self, lease: Lease) -> None:
        self.seen.append(f"claimed {lease.jobid}")

    def idle(self) -> None:
        self.seen.append("idle")
        self.pool.board.stop()


def test_a_busy_slot_changes_its_title_once_per_job_and_shows_idle_when_it_waits(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The title goes from one job to the next as the slot claims it (one
    prctl per job on the hot path), and back to idle only when no job follows."""
    shown: list[str] = []
    monkeypatch.setattr(titles, "_set", shown.append)
    for n in range(3):
        env.bike.set(f"j{n}:A", "NOW")
    pool = WorkerPool(env.c, env.keys, FailsJ1("A"), clock=env.clock)
    recorder = StopsWhenIdle(pool)
    pool.events.subscribe(recorder)
    mine, theirs = socket.socketpair()
    # Should the slot never report itself idle: stopped and woken after 10 s all the same.
    guard = threading.Timer(10, lambda: (pool.board.stop(), mine.send(b"w")))
    guard.start()
    try:
        Slot(pool.claims, pool.events, pool.outcomes, 0, pool.worker_id(0), theirs).run()
    finally:
        guard.cancel()
        mine.close()
        theirs.close()
    assert recorder.seen == ["claimed j0:A", "claimed j1:A", "claimed j2:A", "idle"]
    slot = titles.slot_title(pool.worker_id(0))
    assert shown == [f"{slot} running j0:A", f"{slot} running j1:A", f"{slot} running j2:A", slot]
    assert [env.status(f"j{n}:A").partition(":")[0] for n in range(3)] == ["END", "DIE", "END"]


def test_the_lease_a_claim_makes_is_the_lease_its_init_makes() -> None:
    """Lease.claimed fills the frozen dataclass's fields itself (the claim's
    fast path): it must give what Lease(...) gives, for every field."""
    values = {"jobid": "j:A", "token": "t0", "queue": "A", "worker": "h:1:0", "since": 1.5, "timeout": 30.0,
              "due": 1.25, "attempt": 2}
    assert [field.name for field in dataclasses.fields(Lease)] == list(values)  # a new field: fill it in claimed()
    made = Lease.claimed(**values)
    assert made == Lease(**values) and vars(made) == vars(Lease(**values)) and hash(made) == hash(Lease(**values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.jobid = "k:A"  # type: ignore[misc]
