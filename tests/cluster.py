"""A Redis Cluster the cluster tests start themselves: three primaries and
three replicas of Debian's redis-server 7 (cluster-enabled) on loopback
ports, joined by ``redis-cli --cluster create``. No binary is a failure,
never a skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.cluster
from conftest import free_port, wait_for
from servers import Server, redis7_binary

NODES = 6  # three primaries, each with one replica


def redis_cli() -> str:
    """The redis-cli next to the server binary, else on PATH."""
    beside = os.path.join(os.path.dirname(redis7_binary()), "redis-cli")
    found = beside if os.access(beside, os.X_OK) else shutil.which("redis-cli")
    if not found:
        pytest.fail("no redis-cli to create the test cluster (apt-get install redis-tools)")
    return found


def cluster_ok(server: Server) -> bool:
    """CLUSTER INFO of ``server`` says the cluster serves every slot."""
    try:
        info = server.client().execute_command("CLUSTER INFO")
    except redis.ConnectionError:
        return False
    # redis-py parses the reply into a dict
    return bool(info.get("cluster_state") == "ok") if isinstance(info, dict) else "cluster_state:ok" in str(info)


class Cluster:
    """NODES cluster-enabled servers in ``folder``, made one cluster by start()."""

    def __init__(self, folder: Path, *, certs: dict[str, Path] | None = None, password: str | None = None) -> None:
        """``certs`` (servers.make_certs): TLS only, between the nodes too, with
        client certificates; ``password``: AUTH on every node."""
        self.certs, self.password = certs, password
        self.client_kwargs: dict[str, Any] = {}
        # cluster-port: the bus on a free port of its own (by default the
        # port + 10000, which may be taken, or above 65535).
        config = "cluster-enabled yes\ncluster-node-timeout 2000\ncluster-config-file nodes.conf\n"
        self.cli_options: list[str] = []
        if password:
            config += f"requirepass {password}\nmasterauth {password}\n"
            self.client_kwargs["password"] = password
            self.cli_options += ["-a", password, "--no-auth-warning"]
        if certs:
            config += (f"tls-cluster yes\ntls-replication yes\ntls-cert-file {certs['server.crt']}\n"
                       f"tls-key-file {certs['server.key']}\ntls-ca-cert-file {certs['ca.crt']}\n"
                       # the nodes' own connections to each other (cluster bus, replication)
                       f"tls-client-cert-file {certs['client.crt']}\ntls-client-key-file {certs['client.key']}\n")
            self.client_kwargs.update(ssl=True, ssl_ca_certs=str(certs["ca.crt"]), ssl_certfile=str(certs["client.crt"]),
                                      ssl_keyfile=str(certs["client.key"]))
            self.cli_options += ["--tls", "--cacert", str(certs["ca.crt"]), "--cert", str(certs["client.crt"]),
                                 "--key", str(certs["client.key"])]
        self.nodes = []
        for n in range(NODES):
            node = Server(folder / f"node{n}", [], config=config + f"cluster-port {free_port()}\n",
                          client_kwargs=self.client_kwargs)
            if certs:  # no plain port: whatever reaches a node speaks TLS
                node.config += f"port 0\ntls-port {node.port}\n"
            self.nodes.append(node)

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        created = subprocess.run([redis_cli(), *self.cli_options, "--cluster", "create", *addresses, "--cluster-replicas", "1",
                                  "--cluster-yes"], check=False, capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]
        for node in self.nodes:
            wait_for(lambda node=node: cluster_ok(node), timeout=30, what=f"cluster_state:ok on port {node.port}")
        return self

    @property
    def url(self) -> str:
        """A redis+cluster:// URL naming two of the nodes (any one would do)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port},127.0.0.1:{self.nodes[1].port}"

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", node.port) for node in self.nodes]

    @property
    def port(self) -> int:
        return self.nodes[0].port

    def flushall(self) -> None:
        """FLUSHALL on every primary (a replica refuses it, and follows)."""
        for node in self.nodes:
            client = node.client()
            if client.info("replication")["role"] == "master":
                client.flushall()

    def client(self) -> redis.RedisCluster:
        """A cluster client (started from every node still running)."""
        live = [redis.cluster.ClusterNode("127.0.0.1", node.port) for node in self.nodes
                if node.process and node.process.poll() is None]
        return redis.RedisCluster(startup_nodes=live, decode_responses=True, **self.client_kwargs)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def node_id(server: Server) -> str:
    return str(server.client().execute_command("CLUSTER MYID"))


def move_slot(slot: int, source: Server, target: Server, other_primaries: list[Server]) -> int:
    """Move ``slot`` from primary ``source`` to primary ``target`` as
    ``redis-cli --cluster reshard`` does (IMPORTING, MIGRATING, MIGRATE the
    keys in batches, then NODE everywhere); returns how many keys moved."""
    source_id, target_id = node_id(source), node_id(target)
    to, back = target.client(), source.client()
    to.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
    back.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
    moved = 0
    while keys := back.execute_command("CLUSTER GETKEYSINSLOT", slot, 10):
        back.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
        moved += len(keys)
    for server in (target, source, *other_primaries):  # the replicas learn it from them
        server.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    return moved
