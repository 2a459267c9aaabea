"""Shards: one installation's jobs spread over N job spaces (``shards = N``).

Every Lua script takes keys of one job space, so a job space lives on one
Redis Cluster hash slot. To go past one primary, an installation declares N
shards: shard k is a whole job space of its own, whose prefix is a hash tag
of its own, ``{P:k}`` or ``{P:k.s}``, on the k-th of N equal ranges of the
cluster's slots (shard_prefix), so the shards spread evenly over primaries
that own equal ranges; each job lives on one shard, chosen by a stable hash
of its **routing key**. With ``shards = 1`` (the default) the one shard's prefix is ``P``
itself: the key layout of an installation without shards.

The routing key of a name (a job id, a resource) is, as for Redis Cluster
keys, the text between its first ``{`` and the next ``}`` if that is not
empty, else the whole name. So a job's shard is a pure function of its id
(every command finds it without asking Redis), and jobs that share
resources share a shard by naming the same tag: ``vacuum{h17}.db3:A`` and
``scan{h17}.db3:A`` with the resource ``conns{h17}``. A claim takes all of a
job's needs atomically on its shard, so a set whose needs are on another
shard than the job is refused (NeedsSpanShards, one line). Worker-local
resources (``worker:...``) are counted by the pool and go anywhere.
"""

from __future__ import annotations

import binascii
import functools
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import redis

from .keys import Keys, hash_tag
from .resources import LOCAL_PREFIX, ResourceError

MAX_SHARDS = 1024
CLUSTER_SLOTS = 16384  # a Redis Cluster's hash slots: a key's is CRC16 (XMODEM, binascii.crc_hqx) of its tag, modulo this
T = TypeVar("T")


class NeedsSpanShards(ResourceError):
    """A job needs a resource that lives on another shard (one line for the user)."""


def check_shards(count: object) -> int:
    """A number of shards: a whole number from 1 to MAX_SHARDS (ValueError otherwise)."""
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"shards must be a whole number from 1 to {MAX_SHARDS}, got {count!r}")
    return count


def check_prefix(prefix: str, count: int) -> str:
    """``prefix``, if it can name ``count`` shards: with more than one, each
    shard's prefix is ``{prefix:k}``, so the prefix may not hold a brace of
    its own (its hash tag would then be every shard's: one slot for all)."""
    if count > 1 and ("{" in prefix or "}" in prefix):
        raise ValueError(f"with shards = {count} the prefix must not hold '{{' or '}}' "
                         f"(each shard's prefix is {{{prefix.strip('{}')}:K}}, a hash tag of its own); got {prefix!r}")
    return prefix


@functools.lru_cache(maxsize=4096)
def shard_prefix(prefix: str, index: int, count: int) -> str:
    """The prefix of shard ``index`` of ``count``: ``prefix`` itself for one
    shard, else the hash tag ``{prefix:index}``, or ``{prefix:index.s}`` for
    the first s = 1, 2, ... that puts it in the index-th of ``count`` equal
    ranges of the cluster's slots. Tags that differ in their last character
    alone fall on slots that CRC16's linearity keeps lumped (``{P:0}`` to
    ``{P:5}`` can never split 3/3 over two primaries), while shards on evenly
    spaced slots spread evenly over primaries that own equal ranges, as
    ``redis-cli --cluster create`` makes them."""
    if count == 1:
        return prefix
    low, high = CLUSTER_SLOTS * index // count, CLUSTER_SLOTS * (index + 1) // count
    salt = 0
    while True:
        tag = f"{prefix}:{index}" if salt == 0 else f"{prefix}:{index}.{salt}"
        if low <= binascii.crc_hqx(tag.encode("utf-8", "surrogatepass"), 0) % CLUSTER_SLOTS < high:
            return f"{{{tag}}}"
        salt += 1


def routing_key(name: str) -> str:
    """What decides ``name``'s shard: its hash tag if it has one, else the whole name."""
    tag = hash_tag(name)
    return name if tag is None else tag


def shard_of(name: str, count: int) -> int:
    """The shard of a job id or resource name among ``count`` (stable: CRC-32 of its routing key)."""
    if count == 1:
        return 0
    return zlib.crc32(routing_key(name).encode("utf-8", "surrogatepass")) % count


def check_needs_shard(jobid: str, resources: Iterable[str], count: int) -> None:
    """NeedsSpanShards unless every global resource in ``resources`` is on ``jobid``'s shard."""
    if count == 1:
        return
    home = shard_of(jobid, count)
    for resource in resources:
        if not resource.startswith(LOCAL_PREFIX) and shard_of(resource, count) != home:
            raise NeedsSpanShards(
                f"job {jobid} is on shard {home} of {count} (routing key {routing_key(jobid)!r}) but needs "
                f"{resource}, on shard {shard_of(resource, count)} (routing key {routing_key(resource)!r}): "
                "a claim takes all of a job's needs on its shard; give both the same {tag}")


class Shards:
    """An installation's shards: each one's keys and client (on one server
    all share a client; on a Redis Cluster each has a client of the primary
    that owns its slot)."""

    def __init__(self, prefix: str, clients: list[redis.Redis]) -> None:
        check_shards(len(clients))
        self.prefix = check_prefix(prefix, len(clients))
        self.count = len(clients)
        self.clients = clients
        self.keys = [Keys(shard_prefix(prefix, index, self.count)) for index in range(self.count)]

    @classmethod
    def on(cls, client: redis.Redis, prefix: str, count: int = 1) -> Shards:
        """``count`` shards on the one server ``client`` talks to."""
        return cls(prefix, [client] * check_shards(count))

    @classmethod
    def connect(cls, settings: dict[str, object], prefix: str, count: int = 1) -> Shards:
        """The shards of ``settings`` (clients.connect's): one client per shard
        on a cluster, one client for all otherwise."""
        from .clients import connect  # clients imports config, which reads shards

        check_prefix(prefix, check_shards(count))
        if "cluster" not in settings:
            return cls.on(connect(settings, prefix=prefix), prefix, count)
        return cls(prefix, [connect(settings, prefix=shard_prefix(prefix, index, count)) for index in range(count)])

    def of(self, name: str) -> int:
        """The shard of a job id (or a resource name)."""
        return shard_of(name, self.count)

    def group(self, names: Iterable[T], name_of: Callable[[T], str] = str) -> dict[int, list[T]]:
        """``names`` by shard (in their order within each)."""
        grouped: dict[int, list[T]] = {}
        for item in names:
            grouped.setdefault(self.of(name_of(item)), []).append(item)
        return grouped

    def check_needs(self, jobid: str, needs: Mapping[str, int] | Iterable[Mapping[str, int]]) -> None:
        """NeedsSpanShards unless all of a job's global needs (or those of each of its paths) are on its shard."""
        paths = [needs] if isinstance(needs, Mapping) else list(needs)
        check_needs_shard(jobid, (name for path in paths for name in path), self.count)
