"""Redis Cluster with one job space (redbike/cluster.py): a cluster of three
primaries and three replicas started by the tests (tests/cluster.py); a
dispatcher and a worker pool run through ``url = redis+cluster://...`` with
a hash-tagged prefix, the CLI too; a prefix without a hash tag is refused;
the job space's slot is moved to another primary while jobs run.

What the jobs did is recorded on the session's own server (TESTLOG_URL)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from cluster import Cluster, move_slot
from conftest import free_port, wait_for
from servers import Server, make_certs, pings, write_redis_config
from test_processes import cli, cli_ok, halt, records, runs

from redbike import Redbike, RoundRobin
from redbike.clients import connect
from redbike.config import ConfigError, load_config
from redbike.keys import Keys, hash_tag
from redbike.shards import Shards

ONE_OFFS = 60


@pytest.fixture
def tagged(prefix: str) -> str:
    return f"{{{prefix}}}"


def home_for(tmp_path: Path, cluster: Cluster, prefix: str, lines: str = "") -> Path:
    return write_redis_config(tmp_path / "home", prefix, f"url = {cluster.url}\n{lines}")


def owner_of(cluster: Cluster, prefix: str) -> Server:
    """The node that serves the slot of ``prefix``'s keys."""
    node = cluster.client().get_node_from_key(Keys(prefix).schedules)
    return next(server for server in cluster.nodes if server.port == int(node.port))


def test_hash_tags():
    assert hash_tag("{app}") == "app"
    assert hash_tag("x{app}y") == "app"
    assert hash_tag("{}app") is None  # an empty tag: Redis hashes the whole key
    assert hash_tag("app") is None
    assert hash_tag("a}{b") is None
    assert hash_tag("{a}{b}") == "a"


def test_config_forms(tmp_path, cluster, tagged):
    home = home_for(tmp_path, cluster, tagged)
    settings = load_config(str(home / ".redbike.conf")).redis
    assert settings["cluster"] == [("127.0.0.1", cluster.nodes[0].port), ("127.0.0.1", cluster.nodes[1].port)]
    (home / ".redbike.conf").write_text(
        f"[redbike]\nprefix = {tagged}\n[redbike-redis]\ncluster = true\nhost = 127.0.0.1\n"
        f"port = {cluster.nodes[2].port}\nsocket-timeout = 5\n")
    settings = load_config(str(home / ".redbike.conf")).redis
    assert settings == {"cluster": [("127.0.0.1", cluster.nodes[2].port)], "socket_timeout": 5.0}
    client = connect({**settings, "ssl_ca_certs": "/nonexistent"}, prefix=tagged)  # without ssl: not used
    client.set(Keys(tagged).control, "x")  # through the slot's primary
    assert owner_of(cluster, tagged).client().get(Keys(tagged).control) == "x"
    for lines, error in [("url = redis+cluster://127.0.0.1\n", "must be host:port"),
                         ("url = redis+cluster://u:p@127.0.0.1:1\n", "AUTH and TLS as their own settings"),
                         ("url = redis+cluster://127.0.0.1:1\ndb = 1\n", "db cannot be set with a Redis Cluster"),
                         ("cluster = true\nurl = redis://127.0.0.1:1\n", "cluster = true takes host and port")]:
        (home / ".redbike.conf").write_text(f"[redbike-redis]\n{lines}")
        with pytest.raises(ConfigError, match=error):
            load_config(str(home / ".redbike.conf"))


def test_a_prefix_without_a_hash_tag_is_refused(tmp_path, cluster, prefix, process_env):
    home = home_for(tmp_path, cluster, prefix)
    result = cli(home, process_env, "set", "a:A", "NOW")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "on Redis Cluster the prefix must hold a hash tag" in result.stderr and prefix in result.stderr
    with pytest.raises(ConfigError, match="hash tag"):
        Redbike(RoundRobin(), prefix=prefix, redis_config=load_config(str(home / ".redbike.conf")).redis)



def test_an_unreachable_cluster_is_one_line(tmp_path, tagged, process_env):
    home = write_redis_config(tmp_path / "home", tagged, f"url = redis+cluster://127.0.0.1:{free_port()}\n")
    result = cli(home, process_env, "statuses")
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot reach Redis at Redis Cluster 127.0.0.1:" in result.stderr
    assert "Please provide at least one reachable node" in result.stderr

def test_cli_and_api_on_a_cluster(tmp_path, cluster, tagged, process_env):
    home = home_for(tmp_path, cluster, tagged)
    cli_ok(home, process_env, "set", "one:A", "NOW")
    cli_ok(home, process_env, "set", "daily:B", "FREQ=DAILY")
    assert "one:A" in cli_ok(home, process_env, "statuses")
    info = json.loads(cli_ok(home, process_env, "info", "--json"))
    assert info["redis"]["address"].startswith(f"Redis Cluster 127.0.0.1:{cluster.nodes[0].port},")
    # Every key is on the slot's primary (none on the other primaries).
    owner = owner_of(cluster, tagged)
    keys = Keys(tagged)
    assert owner.client().hget(keys.schedules, "daily:B") == "FREQ=DAILY"
    for node in cluster.nodes:
        if node is not owner and node.client().info("replication")["role"] == "master":
            assert not list(node.client().scan_iter(match=f"{tagged}*"))
    bike = Redbike(RoundRobin(), prefix=tagged, redis_config=load_config(str(home / ".redbike.conf")).redis)
    bike.unset("daily:B")
    statuses = {jobid: status for jobid, status, _ in bike.statuses()}
    assert "one:A" in statuses and "daily:B" not in statuses, statuses
    assert not owner.client().hexists(keys.schedules, "daily:B")


def test_shards_spread_over_the_primaries(tmp_path, cluster, prefix, process_env):
    """shards = 8 with a prefix without a tag: each shard's prefix ({P:k}) is
    its own slot, so the shards (and each job's keys) are on several primaries."""
    home = home_for(tmp_path, cluster, prefix)
    config = home / ".redbike.conf"
    config.write_text(config.read_text().replace("[redbike]\n", "[redbike]\nshards = 8\n", 1))
    shards = Shards.connect(load_config(str(config)).redis, prefix, 8)
    owners = [owner_of(cluster, keys.prefix) for keys in shards.keys]
    # Shard k's slot is in the k-th eighth of the slots. Each primary's third
    # holds two whole eighths; the two eighths that straddle a boundary (shards
    # 2 and 5) go either way with the prefix: 3, 3, 2 or 4, 2, 2 shards.
    ports = [owner.port for owner in owners]
    assert len(set(ports)) == 3 and min(ports.count(port) for port in set(ports)) == 2, ports
    # Each shard's client talks to its slot's primary.
    assert [client.connection_pool.owner()[1] for client in shards.clients] == [owner.port for owner in owners]
    jobids = [f"j{n}:A" for n in range(24)]
    for jobid in jobids:
        cli_ok(home, process_env, "set", jobid, "0 3 * * *")
    for jobid in jobids:
        home_shard = shards.of(jobid)
        for index, keys in enumerate(shards.keys):
            on_owner = owners[index].client().hexists(keys.schedules, jobid)
            assert on_owner == (index == home_shard), (jobid, index)
    assert len(cli_ok(home, process_env, "statuses").splitlines()) == len(jobids)


def _drain(home: Path, daemons: Any, process_env: dict[str, str], bike: Redbike) -> tuple[Any, Any, list[str]]:
    dispatcher = daemons.start("dispatch", cwd=home)
    worker = daemons.start("work", "--concurrency", "4", cwd=home)
    cli_ok(home, process_env, "set", "secondly:B", "FREQ=SECONDLY;INTERVAL=1")
    one_offs = [f"sleep0.05-{n}:A" for n in range(ONE_OFFS)]
    for jobid in one_offs:
        bike.set(jobid, "NOW")
    return dispatcher, worker, one_offs


def ended_jobs(client: redis.Redis, testlog: str) -> set[str]:
    """The jobs whose runs wrote their end to the test log."""
    return {r["job"] for r in records(client, testlog) if r["event"] == "end"}


def _draining(tmp_path: Path, cluster: Any, tagged: str, client: redis.Redis, daemons: Any, testlog: str,
              process_env: dict[str, str]) -> tuple[Path, Redbike, Any, Any, list[str]]:
    """A dispatcher and a worker on the cluster, one-offs and a per-second job
    set, five of the one-offs run: (home, API, dispatcher, worker, one-offs)."""
    home = home_for(tmp_path, cluster, tagged)
    bike = Redbike(RoundRobin(), prefix=tagged, redis_config=load_config(str(home / ".redbike.conf")).redis)
    dispatcher, worker, one_offs = _drain(home, daemons, process_env, bike)
    wait_for(lambda: len(ended_jobs(client, testlog) & set(one_offs)) >= 5, timeout=20, what="some one-offs to run")
    return home, bike, dispatcher, worker, one_offs


def _three_more_secondly_runs(client: redis.Redis, testlog: str) -> None:
    def secondly() -> int:
        return sum(1 for r in records(client, testlog) if r["job"] == "secondly:B" and r["event"] == "end")

    before = secondly()
    wait_for(lambda: secondly() >= before + 3, timeout=30, what="the per-second job to run on the new primary")


def _check_runs(client: redis.Redis, testlog: str, one_offs: list[str]) -> None:
    done = runs(records(client, testlog)).values()
    counts = Counter(run["job"] for run in done if run["job"] in one_offs)
    assert set(counts) == set(one_offs) and set(counts.values()) == {1}, counts
    assert sum(1 for run in done if run["job"] == "secondly:B" and run["end"]) >= 3


def test_daemons_on_a_cluster(tmp_path, cluster, tagged, client, daemons, testlog, process_env):
    home = home_for(tmp_path, cluster, tagged)
    bike = Redbike(RoundRobin(), prefix=tagged, redis_config=load_config(str(home / ".redbike.conf")).redis)
    dispatcher, worker, one_offs = _drain(home, daemons, process_env, bike)

    wait_for(lambda: set(one_offs) <= ended_jobs(client, testlog), timeout=30, what="every one-off to run")
    wait_for(lambda: sum(1 for r in records(client, testlog) if r["job"] == "secondly:B" and r["event"] == "end")
             >= 3, timeout=20, what="the per-second job to run three times")
    statuses = {jobid: status for jobid, status, _ in bike.statuses()}
    assert all(statuses[jobid].startswith("END") for jobid in one_offs)
    # The slots' scripts (FCALLs on Redis 7) ran on the slot's primary.
    assert {"cmdstat_evalsha", "cmdstat_fcall"} <= set(owner_of(cluster, tagged).client().info("commandstats"))
    halt(home, process_env, dispatcher, worker)
    _check_runs(client, testlog, one_offs)


def test_daemons_follow_their_slot_to_another_primary(tmp_path, cluster, tagged, client, daemons, testlog,
                                                      process_env):
    home, bike, dispatcher, worker, one_offs = _draining(tmp_path, cluster, tagged, client, daemons, testlog,
                                                         process_env)

    source = owner_of(cluster, tagged)
    primaries = [node for node in cluster.nodes if node.client().info("replication")["role"] == "master"]
    target = next(node for node in primaries if node is not source)
    slot = cluster.client().keyslot(Keys(tagged).schedules)
    assert move_slot(slot, source, target, [node for node in primaries if node not in (source, target)]) > 5
    assert owner_of(cluster, tagged) is target
    assert not ended_jobs(client, testlog) >= set(one_offs), "the jobs all ran before the slot moved: make them longer"
    later = [f"later-{n}:A" for n in range(10)]
    for jobid in later:  # through the API's client, which follows the slot too
        bike.set(jobid, "NOW")
    wait_for(lambda: {*one_offs, *later} <= ended_jobs(client, testlog), timeout=60, what="every one-off to run")
    _three_more_secondly_runs(client, testlog)
    # The daemons work on the slot's new primary: their scripts (the slots' FCALLs) run there, and
    # the old one has none of the job space's keys.
    assert {"cmdstat_evalsha", "cmdstat_fcall"} <= set(target.client().info("commandstats"))
    assert not list(source.client().scan_iter(match=f"{tagged}*"))
    statuses = {jobid: status for jobid, status, _ in bike.statuses()}
    assert all(statuses[jobid].startswith("END") for jobid in [*one_offs, *later]), statuses
    halt(home, process_env, dispatcher, worker)
    _check_runs(client, testlog, [*one_offs, *later])



def test_a_cluster_over_tls_with_auth(tmp_path, tagged, client, daemons, testlog, process_env):
    """rediss+cluster:// with client certificates and a password, on a cluster
    of its own that speaks only TLS and wants AUTH: the CLI and the daemons."""
    certs = make_certs(tmp_path / "certs")
    secure = Cluster(tmp_path / "tls-cluster", certs=certs, password="s3cret")
    try:
        secure.start()
        nodes = ",".join(f"127.0.0.1:{node.port}" for node in secure.nodes[:2])
        home = write_redis_config(
            tmp_path / "home", tagged,
            f"url = rediss+cluster://{nodes}\npassword = s3cret\nssl_ca_certs = {certs['ca.crt']}\n"
            f"ssl_certfile = {certs['client.crt']}\nssl_keyfile = {certs['client.key']}\n")
        dispatcher = daemons.start("dispatch", cwd=home)
        worker = daemons.start("work", "--concurrency", "2", cwd=home)
        jobs = [f"tls-{n}:A" for n in range(5)]
        for jobid in jobs:
            cli_ok(home, process_env, "set", jobid, "NOW")
        wait_for(lambda: set(jobs) <= {r["job"] for r in records(client, testlog) if r["event"] == "end"},
                 timeout=30, what="the jobs to run over TLS")
        owner = owner_of(secure, tagged)
        assert owner.client().hget(Keys(tagged).statuses, jobs[0]).startswith("END")
        halt(home, process_env, dispatcher, worker)
    finally:
        secure.stop()


def test_daemons_follow_their_slot_when_its_primary_is_killed(tmp_path, cluster, tagged, client, daemons, testlog,
                                                              process_env):
    """The last test of the module: it leaves a primary dead."""
    home, bike, dispatcher, worker, one_offs = _draining(tmp_path, cluster, tagged, client, daemons, testlog,
                                                         process_env)

    old = owner_of(cluster, tagged)
    old.kill()

    def new_owner() -> Server | None:  # a node whose view is not up to date yet may still name the dead one
        owner = owner_of(cluster, tagged)
        return owner if owner is not old and pings(owner.client()) else None

    new = wait_for(new_owner, timeout=30, what="a replica to take over the slot")
    later = [f"later-{n}:A" for n in range(10)]
    for jobid in later:
        bike.set(jobid, "NOW")
    # A run whose end was acknowledged by the old primary but not yet
    # replicated may run again (README: what a failover can lose): each at least once.
    wait_for(lambda: {*one_offs, *later} <= ended_jobs(client, testlog), timeout=60, what="every one-off to run")
    _three_more_secondly_runs(client, testlog)
    assert {"cmdstat_evalsha", "cmdstat_fcall"} <= set(new.client().info("commandstats"))
    done = runs(records(client, testlog)).values()
    counts = Counter(run["job"] for run in done if run["job"] in later)
    assert set(counts.values()) == {1}, counts  # set after the failover: once each
    assert dispatcher.poll() is None and worker.poll() is None
    halt(home, process_env, dispatcher, worker)
