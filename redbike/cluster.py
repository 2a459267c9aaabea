"""Redis Cluster with one job space: every key of the deployment on one hash
slot (the prefix holds a hash tag, keys.hash_tag), so redbike talks to the
one primary that owns that slot, as it talks to a single server.

``[redbike-redis]`` with ``url = redis+cluster://host:port,...`` (or
``rediss+cluster://`` for TLS) or ``cluster = true`` (with ``host``/``port``):
redis-py's RedisCluster, made on first use from those nodes and the other
settings of the stanza (AUTH, TLS), finds the slot's primary; the client
redbike uses is a plain ``redis.Redis`` whose connections connect to that
primary. So pipelines (scripts in them, MULTI/WATCH), pub/sub and a slot's own
connection (slot.py) work as on one server, at the same cost per command.

When the slot moves (a MOVED, ASK or TRYAGAIN reply while it is resharded,
CLUSTERDOWN) or its primary fails (a connection error), the reply becomes a
ConnectionError and the connection is closed: redis-py's client retries
the command (as after any connection error), a worker slot takes its usual
path after a connection error (the finish alone, again: it is idempotent;
a claim that may have run is the reaper's), and the next connection asks
the cluster for the slot's primary again. A MOVED or ASK reply means the
script did not run there, so nothing runs twice; during a slot migration
commands wait (the client's and the slot's backoff) until it completes.
"""

from __future__ import annotations

import copy
import inspect
import os
import threading
from typing import Any

import redis
import redis.cluster
import redis.connection
import redis.exceptions

from .sentinel import addresses  # host:port lists are parsed one way

SCHEMES = ("redis+cluster://", "rediss+cluster://")
DEFAULT_PORT = 6379
# Replies that say the slot is not (or not only) served here: the command did not run.
_REDIRECTS = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError,
              redis.exceptions.ClusterDownError)
# Settings of a node connection that RedisCluster (the discovery client) does not take.
_NOT_FOR_DISCOVERY = ("db", "health_check_interval")


class SlotPool(redis.ConnectionPool):
    """Connections to the primary that owns ``key``'s slot, looked up through
    a RedisCluster of ``nodes`` when a connection connects."""

    def __init__(self, nodes: list[tuple[str, int]], key: str, **kwargs: Any) -> None:
        self.nodes = nodes
        self.key = key
        self.stale = False  # the slot's owner may have changed: ask the cluster again
        self._discovery: redis.cluster.RedisCluster | None = None
        self._owner_lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._discovery_kwargs = {name: value for name, value in kwargs.items() if name not in _NOT_FOR_DISCOVERY}
        connection_class = SlotSSLConnection if kwargs.pop("ssl", False) else SlotConnection
        super().__init__(connection_class=connection_class, **kwargs)
        self.connection_kwargs["connection_pool"] = self

    def owner(self) -> tuple[str, int]:
        """The address of the primary that owns the slot (asks the cluster if stale)."""
        if self._owner_pid != os.getpid():
            # A forked child (a worker slot): the lock may have been held by
            # another thread at the fork, and the discovery client's
            # connections are the parent's. Both anew.
            self._owner_lock, self._owner_pid, self._discovery = threading.Lock(), os.getpid(), None
        with self._owner_lock:
            try:
                if self._discovery is None:
                    startup = [redis.cluster.ClusterNode(host, port) for host, port in self.nodes]
                    self._discovery = redis.cluster.RedisCluster(startup_nodes=startup, **self._discovery_kwargs)
                elif self.stale:
                    self._discovery.nodes_manager.initialize()
                node = self._discovery.get_node_from_key(self.key)
            except redis.exceptions.RedisClusterException as exc:  # not a RedisError: made one
                self.stale = True
                raise redis.ConnectionError(str(exc)) from exc
            except redis.RedisError:
                self.stale = True
                raise
            self.stale = False
            return str(node.host), int(node.port)

    def __repr__(self) -> str:  # not ConnectionPool's: its connection kwargs hold the pool itself
        return f"<{type(self).__name__} {self.describe()}>"

    def describe(self) -> str:
        nodes = ",".join(f"{host}:{port}" for host, port in self.nodes)
        return f"Redis Cluster {nodes} (the slot of {self.key})"


class SlotConnection(redis.connection.Connection):
    """A connection to the primary of the job space's slot, wherever it is
    when the connection connects (see the module's docstring)."""

    def __init__(self, connection_pool: SlotPool, **kwargs: Any) -> None:
        self.slot_pool = connection_pool
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self._sock:
            self.host, self.port = self.slot_pool.owner()
        try:
            super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)
        except redis.ConnectionError:
            self.slot_pool.stale = True
            raise

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except _REDIRECTS as exc:
            self.slot_pool.stale = True
            self.disconnect()  # type: ignore[no-untyped-call]
            raise redis.ConnectionError(f"{type(exc).__name__} {exc} (asking the cluster where the slot is)") from exc
        except (redis.ConnectionError, redis.TimeoutError):
            self.slot_pool.stale = True
            raise


class SlotSSLConnection(SlotConnection, redis.connection.SSLConnection):
    """SlotConnection over TLS."""


def parse_url(url: str) -> tuple[list[tuple[str, int]], bool]:
    """The nodes of ``redis+cluster://host:port,...`` and whether it is TLS (rediss+cluster)."""
    scheme = next(s for s in SCHEMES if url.startswith(s))
    rest = url.removeprefix(scheme).rstrip("/")
    if "@" in rest or "/" in rest or "?" in rest:
        raise ValueError("must be redis+cluster://host:port[,host:port...] (AUTH and TLS as their own settings), "
                         f"got {url!r}")
    return addresses(rest), scheme.startswith("rediss")


def client_for(kwargs: dict[str, Any], key: str) -> redis.Redis:
    """A client of the primary that owns ``key``'s slot in the cluster of
    ``kwargs['cluster']`` (its nodes); the rest of ``kwargs`` are the
    connections' settings."""
    kwargs = dict(kwargs)
    nodes = kwargs.pop("cluster")
    decode = kwargs.pop("decode_responses", True)
    single = kwargs.pop("single_connection_client", False)  # the client's, not its connections'
    # The retries a redis.Redis made from settings gives its connections (not
    # one made from a pool): a MOVED or a lost primary is retried as there.
    kwargs.setdefault("retry", copy.deepcopy(inspect.signature(redis.Redis.__init__).parameters["retry"].default))
    if not kwargs.get("ssl"):  # as redis.Redis does: TLS settings count only with TLS
        kwargs = {name: value for name, value in kwargs.items() if not name.startswith("ssl")}
    pool = SlotPool(nodes, key, decode_responses=decode, **kwargs)
    pool.connection_class(**pool.connection_kwargs)  # a setting it does not take: a TypeError now, not on first use
    return redis.Redis(connection_pool=pool, decode_responses=decode, single_connection_client=single)


def describe(client: redis.Redis) -> str | None:
    """Where ``client`` connects to if it is a cluster's (else None)."""
    pool = client.connection_pool
    return pool.describe() if isinstance(pool, SlotPool) else None
