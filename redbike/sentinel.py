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
