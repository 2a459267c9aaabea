"""Watching redbike: the registry of live processes (real dispatchers and
pools against a real server), the read model on a prepared state, `info`
and `top` (in a pseudo-terminal)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest
import redis
from conftest import ROOT, RedisServer, redbike_command, server_binary, wait_for

from redbike import Redbike, RoundRobin, overview, registry
from redbike.keys import Keys
from redbike.parking import Aside, Parked, encode_aside, encode_parked
from redbike.records import LeaseRecord, encode_lease, error_record


@pytest.fixture
def env(process_env: dict[str, str]) -> dict[str, str]:
    return process_env


def cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(redbike_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=30,
                          check=False)


def info_json(cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    result = cli(cwd, env, "info", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(child) for child in text]
    return found


# -- the registry, with real processes -------------------------------------------

def test_pools_and_dispatchers_register_with_the_leader_marked_and_what_each_slot_runs(workdir, client, prefix,
                                                                                     daemons, env):
    keys = Keys(prefix)
    first = daemons.start("dispatch", cwd=workdir)
    wait_for(lambda: client.get(keys.dispatcher), what="a leader")
    second = daemons.start("dispatch", cwd=workdir)
    pool = daemons.start("work", "--concurrency", "2", cwd=workdir)
    assert cli(workdir, env, "set", "hang-1:A", "NOW").returncode == 0

    def running() -> dict[str, Any] | None:
        shown = info_json(workdir, env)
        busy = [s for w in shown["workers"] for s in w["running"] if s.get("jobid")]
        return shown if len(shown["dispatchers"]) == 2 and busy else None

    shown = wait_for(running, timeout=15, what="two dispatchers and a pool running hang-1:A")
    assert isinstance(shown, dict)
    leader = [d for d in shown["dispatchers"] if d["leads"]]
    assert [d["pid"] for d in leader] == [first.pid]
    assert shown["leader"] == client.get(keys.dispatcher).partition(":")[2]
    [worker] = shown["workers"]
    assert worker["pid"] == pool.pid and worker["queues"] == ["A", "B"] and worker["slots"] == 2
    [busy] = [s for s in worker["running"] if s.get("jobid")]
    lease = client.hget(keys.leases, "hang-1:A")
    assert busy["jobid"] == "hang-1:A" and lease.startswith(busy["token"] + "|") and busy["queue"] == "A"
    assert [q["running"] for q in shown["queues"] if q["queue"] == "A"] == [1]
    assert shown["statuses"].get("WRK") == 1
    # Process titles, as ps shows them.
    assert title(pool.pid) == "redbike work supervisor A:B"
    assert title(first.pid) == "redbike dispatch (leader)" and title(second.pid) == "redbike dispatch (standby)"
    [zygote] = children(pool.pid)
    assert title(zygote) == "redbike work zygote"
    wanted = sorted([f"redbike work slot {busy['slot']} running hang-1:A", f"redbike work slot {1 - busy['slot']}"])
    # The slot shows its run on the board just before work() starts, and its title then.
    wait_for(lambda: sorted(title(child) for child in children(zygote)) == wanted, what=f"slot titles {wanted}")
    # A clean stop removes the entry at once.
    second.send_signal(signal.SIGTERM)
    assert second.wait(10) == 0
    assert [d["pid"] for d in info_json(workdir, env)["dispatchers"]] == [first.pid]


POOL = """
import sys, redis
from redbike import RoundRobin
from redbike.keys import Keys
from redbike.supervisor import WorkerPool
client = redis.Redis.from_url(sys.argv[1], decode_responses=True)
WorkerPool(client, Keys(sys.argv[2]), RoundRobin("Q"), registry_seconds=0.5).run()
"""


def test_a_killed_pool_disappears_after_its_ttl_and_a_live_one_is_refreshed(redis_server: RedisServer, client,
                                                                           prefix):
    keys = Keys(prefix)
    process = subprocess.Popen([sys.executable, "-c", POOL, redis_server.url, prefix], cwd=ROOT,
                               start_new_session=True)
    try:
        entry = wait_for(lambda: registry.live(client, keys), what="the pool's entry")
        assert isinstance(entry, list)
        [first] = entry
        assert first["pid"] == process.pid and client.ttl(keys.process(first["identity"])) <= 2
        # Written again every half second, while nothing changes; it would
        # have expired (1.5 s) otherwise.
        wait_for(lambda: [e["refreshed"] for e in registry.live(client, keys)] > [first["refreshed"] + 2],
                 what="the entry refreshed for 2 s")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        wait_for(lambda: not registry.live(client, keys), timeout=5, what="the killed pool's entry to expire")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_an_entry_is_written_on_change_at_most_once_a_second_else_every_refresh(fake):
    now = [1000.0]
    keys = Keys("r")
    entry = registry.Registration(fake, keys, "worker", "h:1", clock=lambda: now[0], queues=["A"], slots=1)
    assert entry.refresh(running=[]) and fake.ttl(keys.process("h:1")) == registry.TTL_SECONDS
    now[0] += 0.5
    assert not entry.refresh(running=[]) and not entry.refresh(running=[{"slot": 0, "jobid": "j"}])
    now[0] += 0.6
    assert entry.refresh(running=[{"slot": 0, "jobid": "j"}])
    now[0] += registry.REFRESH_SECONDS - 0.1
    assert not entry.refresh(running=[{"slot": 0, "jobid": "j"}])
    now[0] += 0.1
    assert entry.refresh(running=[{"slot": 0, "jobid": "j"}])
    assert json.loads(fake.get(keys.process("h:1")))["running"] == [{"slot": 0, "jobid": "j"}]
    entry.remove()
    assert registry.live(fake, keys) == []


def test_the_registry_pattern_escapes_the_prefix(fake):
    fake.set("a*:process:x", json.dumps({"role": "worker", "identity": "x"}))
    fake.set("ab:process:y", json.dumps({"role": "worker", "identity": "y"}))
    fake.set("a*:process:bad", "{")
    assert [e["identity"] for e in registry.live(fake, Keys("a*"))] == ["x"]


# -- the read model on a prepared state ----------------------------------------------

def prepare(client: redis.Redis, prefix: str) -> float:
    """Jobs in every place the overview counts; returns the time it was read at."""
    keys = Keys(prefix)
    bike = Redbike(RoundRobin(), prefix=prefix, client=client)
    now = bike.clock()
    for jobid in ("a1:A", "a2:A", "b1:B"):
        bike.set(jobid, "NOW")
    bike.set("later:C", "FREQ=DAILY")
    client.hset(keys.statuses, "a1:A", f"ENQ:{int(now - 90)}")  # the oldest of A waits 90 s
    client.zadd(keys.parked, {encode_parked(Parked("host:x", "1", "A", "p1:A")): 0,
                              encode_parked(Parked("host:x", "2", "B", "p2:B")): 0})
    client.zadd(keys.aside, {encode_aside(Aside("host:x", 3, "3", "B", "s1:B")): 0})
    client.hset(keys.leases, "r1:D", encode_lease(LeaseRecord("tok1", "D", "h:1:0", now - 5, 10, now - 5, 1, "")))
    client.hset(keys.capacities, mapping={"host:x": 2, "host:y": 10, "host:z": 0})
    client.hset(keys.usage, mapping={"host:x": 2, "host:y": 1})
    client.hset(keys.errors, mapping={
        "f1:A": error_record("DIE", "ValueError: boom", "h:1:0", now - 60),
        "f2:A": error_record("EXP", "lease expired", "h:1:1", now - 30),
        "old:A": error_record("DIE", "old", "h:1:0", now - 7200),
    })
    return now


def test_the_overview_counts_each_place_and_shows_recent_failures(client, prefix):
    now = prepare(client, prefix)
    shown = overview.read(client, Keys(prefix), now)
    queues = {q["queue"]: q for q in shown["queues"]}
    assert set(queues) == {"A", "B", "D"}  # C has no job waiting, parked or running
    assert queues["A"] == {"queue": "A", "waiting": 2, "parked": 1, "ready": 0, "aside": 0, "running": 0,
                           "oldest_since": int(now - 90), "paused": False,
                           "per_minute_5m": None, "per_minute_60m": None}  # no dispatcher took a snapshot
    assert (queues["B"]["waiting"], queues["B"]["parked"], queues["B"]["aside"]) == (1, 1, 1)
    assert queues["D"]["running"] == 1 and queues["D"]["waiting"] == 0
    assert shown["statuses"] == {"ENQ": 3, "TML": 1}
    assert {r["resource"]: (r["in_use"], r["capacity"], r["waiting"]) for r in shown["resources"]} == \
        {"host:x": (2, 2, 3), "host:z": (0, 0, 0)}  # full, and paused; host:y has room
    assert shown["failures"]["count"] == 2
    assert [f["jobid"] for f in shown["failures"]["recent"]] == ["f2:A", "f1:A"]
    assert shown["redis"]["version"] and shown["redis"]["address"].endswith(str(client.connection_pool
                                                                              .connection_kwargs["port"]))
    assert shown["dispatchers"] == [] and shown["workers"] == [] and shown["leader"] is None
    assert overview.read(client, Keys(prefix), now, scan=False)["statuses"] is None


def test_info_prints_one_screen_with_ages(workdir, client, prefix, env):
    prepare(client, prefix)
    result = cli(workdir, env, "info")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "no leading dispatcher" in text and "Workers: 0 pool(s)" in text
    [row_a] = [line.split() for line in text.splitlines() if line.startswith("  A ")]
    assert row_a[:8] == ["A", "2", "1", "0", "0", "0", "1", "min"]  # the oldest waits 1 min 30 s
    assert "Statuses: ENQ 3, TML 1  (4 jobs)" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["host:x", "2", "2", "3"] in rows and ["host:z", "0", "0", "(paused)", "0"] in rows
    # 30 s old when prepared: a few seconds more by the time a loaded machine has started the command
    assert "Failures in the last hour: 2" in text and re.search(r"\(3\d s ago\)  f2:A  EXP  lease expired", text)
    assert len(text.splitlines()) < 40
    # Not on a terminal, top prints the same once.
    top = cli(workdir, env, "top")
    assert top.returncode == 0 and top.stdout.startswith(f"redbike (prefix {prefix})")
    assert "Statuses: ENQ 3, TML 1  (4 jobs)" in top.stdout and "Failures in the last hour: 2" in top.stdout
    bad = cli(workdir, env, "top", "--interval=0")
    assert bad.returncode == 2 and bad.stderr.startswith("redbike: --interval") and "Traceback" not in bad.stderr


@pytest.mark.parametrize("key,shows", [("4", "Resources at or near capacity"), ("3", "Failures in the last hour"),
                                       ("w", "Workers and their slots")])
def test_top_shows_the_queues_switches_view_and_quits_on_q(workdir, client, prefix, env, key, shows):
    prepare(client, prefix)
    child = pexpect.spawn(sys.executable, ["-m", "redbike", "top", "--interval", "0.3"], cwd=str(workdir),
                          env=dict(env, TERM="xterm"), dimensions=(40, 140), encoding="utf-8", timeout=15)
    try:
        child.expect("Queues")
        child.expect("oldest waits")
        child.expect(r"[│|] A +[│|] 2 +[│|] 1 ")
        child.send(key)
        child.expect(shows)
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_info_names_the_embedded_server(tmp_path: Path, process_env: dict[str, str]):
    from redbike.embedded import stop_server

    folder = tmp_path / "project"
    folder.mkdir()
    env = dict(process_env, REDBIKE_REDIS_SERVER=server_binary())
    try:
        result = cli(folder, env, "info", "--json")
        assert result.returncode == 0, result.stderr
        shown = json.loads(result.stdout)["redis"]
        data = folder / ".redbike"
        assert shown["embedded"] == {"pid": int((data / "redis.pid").read_text()), "socket": str(data / "redis.sock"),
                                     "folder": str(data)}
        text = cli(folder, env, "info").stdout.splitlines()[1]
        assert f"embedded: pid {shown['pid']}, socket {data / 'redis.sock'}, folder {data}" in text
    finally:
        stop_server(str(folder / ".redbike"))
