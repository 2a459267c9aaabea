"""Sentinel: one primary, one replica and three sentinels on loopback ports;
a worker pool drains one-off jobs while a dispatcher fires a per-second
schedule, through `sentinels`/`service` in [redbike-redis]; then the primary
goes (SENTINEL FAILOVER, or SIGKILL) and the daemons must follow Sentinel to
the new primary and go on: every one-off runs, no job's runs overlap, and
the per-second job keeps running.

What the jobs did is recorded on the session's own server (TESTLOG_URL),
which no failover touches."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import wait_for
from servers import Server, sentinel_command, write_redis_config
from test_processes import cli_ok, halt, records, runs

from redbike import Redbike, RoundRobin
from redbike.clients import connect
from redbike.config import load_config
from redbike.keys import Keys

SERVICE = "mymaster"
ONE_OFFS = 40


class Group:
    """The primary, its replica and three sentinels watching them."""

    def __init__(self, folder: Path) -> None:
        self.primary = Server(folder / "primary", [])
        self.replica = Server(folder / "replica", ["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinels = [
            Server(folder / f"sentinel{n}", [], command=sentinel_command())
            for n in range(3)
        ]
        for sentinel in self.sentinels:
            # Small delays: the primary is deemed down after 1 s without a
            # reply, and a failover that stalls is tried again after 5 s.
            sentinel.config = (
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        wait_for(lambda: self.replica.client().info("replication")["master_link_status"] == "up",
                 what="the replica to sync")
        for sentinel in self.sentinels:
            sentinel.start()
        # Each sentinel knows the replica and the two other sentinels: a failover can be agreed.
        wait_for(lambda: all(self._ready(sentinel) for sentinel in self.sentinels), timeout=20,
                 what="the sentinels to find the replica and each other")

    @staticmethod
    def _ready(sentinel: Server) -> bool:
        state = sentinel.client().sentinel_master(SERVICE)
        return int(state["num-slaves"]) == 1 and int(state["num-other-sentinels"]) == 2

    def primary_port(self) -> int:
        _host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.kill()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    started = Group(tmp_path / "sentinel-group")
    try:
        started.start()
        yield started
    finally:
        started.stop()


def _drain_through_a_failover(tmp_path: Path, group: Group, client: redis.Redis, prefix: str, daemons: Any,
                              testlog: str, env: dict[str, str], fail: Callable[[], None], *,
                              old_primary_lives: bool = False) -> None:
    sentinels = ",".join(f"127.0.0.1:{s.port}" for s in group.sentinels)
    home = write_redis_config(tmp_path / "home", prefix, f"sentinels = {sentinels}\nservice = {SERVICE}\n")
    keys = Keys(prefix)
    dispatcher = daemons.start("dispatch", cwd=home)
    worker = daemons.start("work", "--concurrency", "4", cwd=home)
    wait_for(lambda: group.primary.client().get(keys.dispatcher), what="the dispatcher to lead")

    bike_client = connect(load_config(str(home / ".redbike.conf")).redis)
    assert bike_client.info("server")["tcp_port"] == group.primary.port  # through Sentinel, to the primary
    cli_ok(home, env, "set", "secondly:B", "FREQ=SECONDLY;INTERVAL=1")
    one_offs = [f"sleep0.2-{n}:A" for n in range(ONE_OFFS)]
    bike = Redbike(RoundRobin(), prefix=prefix, client=bike_client)
    for jobid in one_offs:
        bike.set(jobid, "NOW")

    def ended() -> set[str]:
        return {r["job"] for r in records(client, testlog) if r["event"] == "end"}

    wait_for(lambda: len(ended() & set(one_offs)) >= ONE_OFFS // 4, timeout=20, what="some one-offs to run")
    old = group.primary.port
    fail()
    wait_for(lambda: group.primary_port() != old, timeout=30, what="Sentinel to promote the replica")
    switched = time.time()
    assert group.primary_port() == group.replica.port
    cli_ok(home, env, "set", "after:A", "NOW")  # on the new primary
    address = json.loads(cli_ok(home, env, "info", "--json"))["redis"]["address"]
    assert address == f"Sentinel service {SERVICE} (sentinels {sentinels})"
    wait_for(lambda: "after:A" in ended(), timeout=20, what="a job set on the new primary to run")
    if old_primary_lives:
        # The daemons came to the new primary on their own: Sentinel has not
        # yet made the old one a replica (it waits 8 s), which would have
        # closed their connections to it.
        assert group.primary.client().info("replication")["role"] == "master"

    wait_for(lambda: {*one_offs, "after:A"} <= ended(), timeout=30, what="every one-off to run")
    wait_for(lambda: sum(1 for r in records(client, testlog)
                         if r["job"] == "secondly:B" and r["event"] == "start" and r["at"] > switched) >= 3,
             timeout=20, what="the per-second job to run after the failover")
    # What they did is on the new primary, where the daemons loaded their
    # scripts again (a replica's script cache is empty: Redis 7 replicates a
    # script's effects, not the script).
    new = group.replica.client()
    assert "cmdstat_script|load" in new.info("commandstats")
    statuses = new.hmget(keys.statuses, [*one_offs, "after:A"])
    assert all(status.startswith("END:") for status in statuses), statuses

    by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in sorted(runs(records(client, testlog)).values(), key=lambda run: run["start"]):
        by_job[run["job"]].append(run)
    for job, job_runs in by_job.items():
        for first, second in pairwise(job_runs):
            assert first["end"] is not None and second["start"] >= first["end"], f"{job} ran twice at once: {job_runs}"
    again = {job: len(job_runs) for job, job_runs in by_job.items() if job != "secondly:B" and len(job_runs) > 1}
    print(f"one-offs run again after the failover (their end was lost with the old primary): {again}")
    assert dispatcher.poll() is None and worker.poll() is None
    halt(home, env, dispatcher, worker)


def test_daemons_follow_a_sentinel_failover(tmp_path, group, client, prefix, daemons, testlog, process_env):
    # With min-replicas-to-write, the old primary refuses writes as soon as
    # its replica leaves it to be promoted; the daemons then ask Sentinel again
    # (redbike/sentinel.py) rather than work on for the ~10 s until Sentinel
    # makes it a replica, work that its resync would then throw away.
    group.primary.client().config_set("min-replicas-to-write", 1)
    group.primary.client().config_set("min-replicas-max-lag", 2)

    def failover() -> None:
        assert group.sentinels[0].client().execute_command("SENTINEL", "FAILOVER", SERVICE) in ("OK", True)

    _drain_through_a_failover(tmp_path, group, client, prefix, daemons, testlog, process_env, failover,
                              old_primary_lives=True)


def test_daemons_follow_sentinel_when_the_primary_is_killed(tmp_path, group, client, prefix, daemons, testlog,
                                                            process_env):
    _drain_through_a_failover(tmp_path, group, client, prefix, daemons, testlog, process_env, group.primary.kill)
