"""Turning the Redis settings of the config file (``[redbike-redis]``, read
by config.py) into a client: a plain one, a Sentinel primary's, a Redis
Cluster node's, or, with none, the embedded server's.

Unless the file says otherwise, every connection has a ``socket_timeout`` of
30 s and, over TCP, keepalive probes that find a silently dropped connection
within about 30 s: a read on a dead connection must not block a slot or the
heartbeat for the many minutes the kernel would otherwise wait.  redbike makes
no blocking call that waits longer (pub/sub is polled with a short timeout).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import redis

from . import cluster, embedded, sentinel
from .config import ConfigError, one_line, redis_parameters
from .keys import slot_key

logger = logging.getLogger(__name__)

# Used when nothing else is configured: a dead connection (e.g. after a
# NAT/firewall silently dropped it) is noticed before a command is sent on it.
DEFAULT_HEALTH_CHECK_INTERVAL = 30
# ... and a read on one that died after the command was sent gives up.
DEFAULT_SOCKET_TIMEOUT = 30.0
# TCP keepalive: first probe after 15 s idle, then every 5 s, dead after 3
# unanswered: an idle connection silently dropped is found within ~30 s.
# macOS names the idle time TCP_KEEPALIVE. And (Linux) a request left
# unacknowledged for 30 s ends its connection: with both, a connection read
# without a socket timeout (a worker slot's) still cannot hang on a dead peer.
_KEEPALIVE = ((("TCP_KEEPIDLE", "TCP_KEEPALIVE"), 15), (("TCP_KEEPINTVL",), 5), (("TCP_KEEPCNT",), 3),
              (("TCP_USER_TIMEOUT",), 30_000))


def keepalive_options() -> dict[int, int]:
    """The TCP keepalive socket options this platform has."""
    options: dict[int, int] = {}
    for names, value in _KEEPALIVE:
        for name in names:
            if hasattr(socket, name):
                options[getattr(socket, name)] = value
                break
    return options


def _embedded_socket(embedded_dir: str | None) -> str:
    """Start (unless it runs) the embedded server of ``embedded_dir``, else of
    the nearest ``.redbike/`` here or above, else of a new ``./.redbike/``."""
    found = embedded_dir or embedded.find_folder()
    try:
        socket_path = embedded.ensure_server(found or embedded.DEFAULT_FOLDER)
    except embedded.EmbeddedError as exc:
        raise ConfigError(str(exc)) from exc
    folder = os.path.dirname(socket_path)
    if found is None:
        # Loud: a command run from the wrong folder would otherwise silently
        # work on a new, empty server.
        logger.warning(
            "redbike: no Redis configured and no .redbike/ folder here or above: "
            "started a new embedded Redis server in %s (stop it with 'redbike embedded stop')",
            folder,
        )
    else:
        logger.info(
            "redbike: no Redis configured; using the embedded Redis server in %s (socket %s)",
            folder,
            os.path.basename(socket_path),
        )
    return socket_path


# redis-py >= 5 names itself to the server with CLIENT SETINFO on connecting.
# Redis < 7.2 has no such command, and so an ACL line cannot allow it there
# (and Redis >= 7.2 logs its refusal): off, so that one least-privilege ACL
# line (README, "Running at scale") fits every server. driver_info=None
# turns it off since redis-py 8, lib_name/lib_version=None before.
_NO_CLIENT_SETINFO: dict[str, None] = (
    {"driver_info": None} if "driver_info" in redis_parameters()
    else {"lib_name": None, "lib_version": None} if "lib_name" in redis_parameters()
    else {}
)


def connect(settings: dict[str, object], *, embedded_dir: str | None = None, prefix: str = "redbike") -> redis.Redis:
    """A client (``decode_responses=True``) for ``settings``; empty: the embedded
    server of ``embedded_dir`` (default: found as :func:`embedded.find_folder` does).
    On a Redis Cluster, a client of the primary that owns the slot of
    ``prefix``'s keys (ConfigError if the prefix has no hash tag).

    Does not contact the server (except to start the embedded one); use
    :func:`check_reachable` for that.
    """
    if not settings:
        settings = {"unix_socket_path": _embedded_socket(embedded_dir)}
    kwargs: dict[str, Any] = dict(settings)
    url = kwargs.pop("url", None)
    # Set explicitly: redis-py's default differs between versions (none
    # before 8, 5 s since). No redbike read blocks for longer: pub/sub waits
    # poll with get_message(timeout=...), which is not bound by it.
    kwargs.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
    kwargs.setdefault("health_check_interval", DEFAULT_HEALTH_CHECK_INTERVAL)
    unix = "unix_socket_path" in kwargs or (url is not None and str(url).startswith("unix://"))
    if not unix and kwargs.setdefault("socket_keepalive", True):
        kwargs["socket_keepalive_options"] = keepalive_options()
    kwargs["decode_responses"] = True
    kwargs.update(_NO_CLIENT_SETINFO)
    if "cluster" in kwargs:
        try:
            key = slot_key(prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        if "sentinels" in kwargs:
            return sentinel.master_for(kwargs)
        if "cluster" in kwargs:
            return cluster.client_for(kwargs, key)
        if url is not None:
            return redis.Redis.from_url(str(url), **kwargs)
        return redis.Redis(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid Redis settings: {one_line(exc)}") from exc


def describe_client(client: redis.Redis) -> str:
    """Where ``client`` connects to, for messages: ``host:port``, ``unix socket PATH``
    or the Sentinel service."""
    described = cluster.describe(client)
    if described is not None:
        return described
    if "path" in client.connection_pool.connection_kwargs:
        return f"unix socket {sentinel.address(client)}"
    return sentinel.address(client)


def check_reachable(client: redis.Redis) -> None:
    """PING the server; raise :class:`ConfigError` (one line) if that fails."""
    try:
        client.ping()
    except redis.RedisError as exc:
        # Covers ConnectionError, TimeoutError and AuthenticationError and
        # also e.g. "-ERR ... AUTH" replies: none leaves a usable connection.
        reason = one_line(exc) or type(exc).__name__
        raise ConfigError(f"cannot reach Redis at {describe_client(client)}: {reason}") from exc
