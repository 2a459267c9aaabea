"""Shards (shards = N): routing, the command line over shards, and a
dispatcher process per installation leading every shard (issue #12).

Run against one server and (REDBIKE_TEST_CLUSTER=1) against a Redis
Cluster, where the shards' slots are on different primaries."""

from __future__ import annotations

import os
import signal
import uuid
import zlib
from collections import Counter
from pathlib import Path

import pytest
import redis
from conftest import RedisServer, wait_for, write_config
from redis.crc import key_slot
from test_processes import cli, cli_ok, records, runs

from redbike.config import ConfigError, load_config
from redbike.keys import Keys, hash_tag
from redbike.shards import (
    CLUSTER_SLOTS,
    NeedsSpanShards,
    Shards,
    check_prefix,
    shard_of,
    shard_prefix,
)

COUNT = int(os.environ.get("REDBIKE_TEST_SHARDS", "4"))  # .ci/run's cluster pass sets 8


def test_a_jobs_shard_is_its_routing_keys_crc32_and_shared_by_its_hash_tag() -> None:
    assert shard_of("anything:A", 1) == 0
    assert shard_of("x:A", 8) == zlib.crc32(b"x:A") % 8  # stable: not Python's salted hash()
    assert shard_of("vacuum{h17}.db3:A", 8) == shard_of("scan{h17}.db1:B", 8) == shard_of("conns{h17}", 8)
    assert shard_of("x{}:A", 8) == zlib.crc32(b"x{}:A") % 8  # an empty tag is no tag (as Redis reads it)
    spread = [shard_of(f"job{n}:A", 8) for n in range(1000)]
    assert all(spread.count(k) > 60 for k in range(8))


def test_each_shard_has_a_prefix_and_a_slot_of_its_own() -> None:
    assert shard_prefix("app", 0, 1) == "app"  # one shard: the layout of an installation without shards
    for count in (2, 4, 6, 8, 1024):  # each on the k-th of count equal ranges of the slots
        prefixes = [shard_prefix("app", k, count) for k in range(count)]
        assert all(p.startswith(f"{{app:{k}") and hash_tag(p) == p[1:-1] for k, p in enumerate(prefixes))
        assert [key_slot(p.encode()) * count // CLUSTER_SLOTS for p in prefixes] == list(range(count))
    # So they spread evenly over primaries with equal ranges (plain {app:k} tags cannot split 6 as 3/3 over 2).
    assert sorted(key_slot(shard_prefix("app", k, 6).encode()) < CLUSTER_SLOTS // 2 for k in range(6)) == [
        False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="must not hold"):
        check_prefix("{app}", 2)
    assert check_prefix("{app}", 1) == "{app}"


def test_needs_on_another_shard_are_refused() -> None:
    shards = Shards.on(redis.Redis(), "p", 8)
    shards.check_needs("a{h1}:A", {"conns{h1}": 1, "worker:cpu": 4})  # worker-local: anywhere
    other = next(f"conns{{h{n}}}" for n in range(100) if shard_of(f"h{n}", 8) != shard_of("h1", 8))
    with pytest.raises(NeedsSpanShards, match="give both the same"):
        shards.check_needs("a{h1}:A", {other: 1})
    with pytest.raises(NeedsSpanShards):
        shards.check_needs("a{h1}:A", [{"conns{h1}": 1}, {other: 1}])  # every alternative path


@pytest.mark.parametrize(("text", "error"), [
    ("shards = 0", "from 1 to"), ("shards = many", "from 1 to"), ("shards = 2\nprefix = {app}", "must not hold"),
])
def test_bad_shards_in_the_config_are_one_line(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "c.conf"
    path.write_text(f"[redbike]\n{text}\n")
    with pytest.raises(ConfigError, match=error):
        load_config(str(path))
    path.write_text("[redbike]\nshards = 16\nprefix = app\n")
    assert load_config(str(path)).shards == 16


# -- the command line over shards, on real servers -----------------------------------------


@pytest.fixture
def sharded(tmp_path: Path, redis_server: RedisServer) -> tuple[Path, str, redis.Redis]:
    """A folder whose config names COUNT shards (a prefix without a tag:
    each shard's prefix is a tag), and a client that reads any shard's keys."""
    prefix = f"s{uuid.uuid4().hex[:8]}"
    folder = write_config(tmp_path / "work", prefix, redis_server.url)
    config = folder / ".redbike.conf"
    config.write_text(config.read_text().replace("[redbike]\n", f"[redbike]\nshards = {COUNT}\n", 1))
    return folder, prefix, redis_server.client()


def ids_on_every_shard(per_shard: int, queue: str = "A", stem: str = "j", count: int = COUNT) -> list[str]:
    """``per_shard`` job ids on each of ``count`` shards (shard 0's first)."""
    found: dict[int, list[str]] = {}
    n = 0
    while any(len(found.get(k, [])) < per_shard for k in range(count)):
        jobid = f"{stem}{n}:{queue}"
        found.setdefault(shard_of(jobid, count), []).append(jobid)
        n += 1
    return [jobid for k in range(count) for jobid in found[k][:per_shard]]


def test_jobs_go_to_their_shards_and_the_listings_merge_them(sharded, process_env) -> None:
    folder, prefix, reader = sharded
    jobids = ids_on_every_shard(3)
    for jobid in jobids:
        cli_ok(folder, process_env, "set", jobid, "0 3 * * *")
    for jobid in jobids:  # each on its shard only
        home = shard_of(jobid, COUNT)
        assert [reader.hexists(Keys(shard_prefix(prefix, k, COUNT)).schedules, jobid) for k in range(COUNT)] == [
            k == home for k in range(COUNT)]
    assert not reader.exists(Keys(prefix).schedules)  # nothing under the bare prefix
    listed = cli_ok(folder, process_env, "schedules").splitlines()
    assert sorted(listed) == sorted(f"{jobid},0 3 * * *" for jobid in jobids)
    assert len(cli_ok(folder, process_env, "statuses").splitlines()) == len(jobids)
    told = cli_ok(folder, process_env, "tell", jobids[-1])
    assert f'"shard": {shard_of(jobids[-1], COUNT)}' in told and '"schedule": "0 3 * * *"' in told
    cli_ok(folder, process_env, "unset", jobids[0])
    assert cli(folder, process_env, "tell", jobids[0]).returncode == 3
    assert cli(folder, process_env, "unset", jobids[0]).returncode == 3


def test_needs_and_capacities_live_on_their_routing_keys_shard(sharded, process_env) -> None:
    folder, prefix, reader = sharded
    cli_ok(folder, process_env, "capacity", "conns{h1}", "2")
    home = shard_of("h1", COUNT)
    assert reader.hget(Keys(shard_prefix(prefix, home, COUNT)).capacities, "conns{h1}") == "2"
    cli_ok(folder, process_env, "set", "vacuum{h1}.db3:A", "0 3 * * *", "--needs=conns{h1}")
    assert "conns{h1},2,0,0" in cli_ok(folder, process_env, "capacities")
    other = next(f"h{n}" for n in range(100) if shard_of(f"h{n}", COUNT) != home)
    bad = cli(folder, process_env, "set", f"vacuum{{{other}}}.db3:A", "0 3 * * *", "--needs=conns{h1}")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "give both the same {tag}" in bad.stderr
    assert not reader.hexists(Keys(shard_prefix(prefix, shard_of(other, COUNT), COUNT)).schedules,
                              f"vacuum{{{other}}}.db3:A")  # nothing stored
    refused = cli(folder, process_env, "nodes")
    assert refused.returncode == 2 and "not yet supported with shards > 1" in refused.stderr


def test_one_dispatcher_process_fires_every_shard_and_a_second_takes_over_a_dead_ones_shards(
        sharded, process_env, daemons) -> None:
    folder, prefix, reader = sharded
    keys = [Keys(shard_prefix(prefix, k, COUNT)) for k in range(COUNT)]
    first = daemons.start("dispatch", cwd=folder)
    wait_for(lambda: all(reader.get(k.dispatcher) for k in keys), timeout=20, what="a leader on every shard")
    leaders = {reader.get(k.dispatcher) for k in keys}
    second = daemons.start("dispatch", cwd=folder)
    # Due jobs on every shard go to their shard's queue (nobody works them).
    jobids = ids_on_every_shard(2)
    for jobid in jobids:
        cli_ok(folder, process_env, "set", jobid, "NOW")
    wait_for(lambda: all(reader.llen(keys[shard_of(j, COUNT)].queue("A")) == 2 for j in jobids), timeout=20,
             what="every shard's jobs in its queue")
    timefile = Path(load_config(str(folder / ".redbike.conf")).timefile or "")
    wait_for(lambda: all(Path(f"{timefile}.{k}").exists() for k in range(COUNT)), timeout=20,
             what="a timefile per shard")
    assert not timefile.exists()
    # The first process dies: the second leads every shard within a lease.
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    wait_for(lambda: all(reader.get(k.dispatcher) not in leaders | {None} for k in keys), timeout=30,
             what="the second process leading every shard")
    later = ids_on_every_shard(3)[2::3]
    for jobid in later:
        cli_ok(folder, process_env, "set", jobid, "NOW")
    wait_for(lambda: all(reader.llen(keys[k].queue("A")) == 3 for k in range(COUNT)), timeout=20,
             what="the later jobs fired by the second process")
    cli_ok(folder, process_env, "control", "HALT")  # every shard: the process stops
    assert second.wait(20) == 0
    assert all(reader.get(k.control).startswith("HALT") for k in keys)


def test_a_dispatcher_and_two_pools_run_every_shards_jobs_once(sharded, process_env, daemons, testlog) -> None:
    folder, prefix, reader = sharded
    keys = [Keys(shard_prefix(prefix, k, COUNT)) for k in range(COUNT)]
    dispatcher = daemons.start("dispatch", cwd=folder)
    pools = [daemons.start("work", "--concurrency", "2", cwd=folder) for _ in range(2)]
    one_offs = ids_on_every_shard(10, stem="sleep0.05-")  # each sleeps 50 ms (testworker.py)
    secondly = ids_on_every_shard(1, queue="B")
    for jobid in secondly:
        cli_ok(folder, process_env, "set", jobid, "FREQ=SECONDLY;INTERVAL=1")
    for jobid in one_offs:
        cli_ok(folder, process_env, "set", jobid, "NOW")

    def ended(job: str) -> int:
        return sum(1 for r in records(reader, testlog) if r["job"] == job and r["event"] == "end")

    wait_for(lambda: all(ended(jobid) for jobid in one_offs), timeout=60, what="every shard's one-offs to run")
    wait_for(lambda: all(ended(jobid) >= 3 for jobid in secondly), timeout=30, what="each shard's per-second job")
    cli_ok(folder, process_env, "control", "HALT")
    for process in [dispatcher, *pools]:
        assert process.wait(30) == 0
    done = Counter(run["job"] for run in runs(records(reader, testlog)).values() if run["end"])
    assert {jobid: done[jobid] for jobid in one_offs} == dict.fromkeys(one_offs, 1)
    # Each shard's jobs ran there: its statuses say END, and no lease is left on any shard.
    for jobid in one_offs:
        assert reader.hget(keys[shard_of(jobid, COUNT)].statuses, jobid).startswith("END")
    assert not any(reader.hlen(k.leases) for k in keys)
