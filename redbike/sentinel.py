"""Redis Sentinel: a deployment whose primary Sentinel names and moves.

``[redbike-redis]`` with ``sentinels = host:port,...`` and ``service = NAME``
(see config.py): every connection asks the sentinels where the primary is
when it connects. After a failover, a connection to the old primary fails
(it was killed, or the old primary, now a replica, answers READONLY, or
Sentinel closes its clients when it reconfigures it) and connects again, to
the new primary; the scripts are loaded again on NOSCRIPT (scripts.py).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.sentinel

# Connect and read timeout (s) of a connection to a sentinel: a dead sentinel
# must not hold up the search for the primary, the next one is asked.
SENTINEL_TIMEOUT = 2.0
DEFAULT_SENTINEL_PORT = 26379
NOREPLICAS = "NOREPLICAS"  # the error of a write refused by min-replicas-to-write


def addresses(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` (an IPv6 host in brackets: ``[::1]:26379``)."""
    found = []
    for item in value.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not (colon and host and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"must be host:port[,host:port...], got {value!r}")
        found.append((host, int(port)))
    return found


class PrimaryConnection(redis.sentinel.SentinelManagedConnection):
    """A connection to the primary that asks Sentinel where it is however it
    connects. redis-py's asks only in connect(), which its pool calls; since
    redis-py 8, a connection used on its own (a slot's, see slot.py)
    connects from send_packed_command() through connect_check_health() and
    would go to localhost:6379."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if not self._sock and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            # A primary with min-replicas-to-write that lost its replicas (the
            # one Sentinel promoted among them) refuses writes: maybe it is no
            # longer the primary, Sentinel will say. Until Sentinel makes it a
            # replica (seconds later) it would otherwise keep this connection.
            if self.connection_pool.is_master and str(exc).startswith(NOREPLICAS):
                self.disconnect()  # type: ignore[no-untyped-call]
                raise redis.ConnectionError(f"{exc} (asking Sentinel for the primary again)") from exc
            raise


class PrimarySSLConnection(PrimaryConnection, redis.connection.SSLConnection):
    """PrimaryConnection over TLS."""


def master_for(kwargs: dict[str, Any]) -> redis.Redis:
    """A client of the primary Sentinel names for ``kwargs['service']``.

    Each connection asks the sentinels for the primary's address when it
    connects; it connects again (and so asks again) after a connection error
    or a READONLY reply (the primary it used was made a replica). A slot's
    own connection (slot.py) is made from the pool's connection class and
    arguments, so it follows a failover the same way."""
    kwargs = dict(kwargs)
    sentinels = kwargs.pop("sentinels")
    service = kwargs.pop("service")
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
    }
    for key in ("sentinel_username", "sentinel_password"):
        if key in kwargs:
            sentinel_kwargs[key.removeprefix("sentinel_")] = kwargs.pop(key)
    kwargs["connection_class"] = PrimarySSLConnection if kwargs.pop("ssl", False) else PrimaryConnection
    manager = redis.sentinel.Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)
    client: redis.Redis = manager.master_for(service, **kwargs)
    return client


def address(client: redis.Redis) -> str:
    """Where ``client`` connects to: ``host:port``, the socket path, or the
    Sentinel service and its sentinels."""
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        sentinels = ",".join(
            f"{kw.get('host', 'localhost')}:{kw.get('port', DEFAULT_SENTINEL_PORT)}"
            for kw in (s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels)
        )
        return f"Sentinel service {pool.service_name} (sentinels {sentinels})"
    kwargs = pool.connection_kwargs
    return str(kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}")
