"""Reconciliation: keep one task per (job family, node) in step with the nodes.

Given the nodes of every source (nodesources.NodeLoader), one pass

1. sets the per-node capacities: each level's (``capacity.LEVEL``) on the
   resource ``NAME@NODE`` of every node of that level, a node's own
   (``override.NODE``) over them; a vanished node's are made unlimited again;
2. stores the node list in ``P:nodes`` (what ``redbike nodes`` shows, and
   each source's last good list after a restart);
3. sets the task of every (family, node of its level) that is new or whose
   family changed (schedule, needs on its path, policy), with the family's
   schedule, needing the family's per-level amounts on its node and every
   ancestor: ``scan/db-host-17/db3:batch`` needs ``host_concurrency@db-host-17``
   and ``db_lock@db3``. New tasks are set in pipelined batches;
4. removes the tasks no family and node want any more: unset at once when
   idle; a running one is recorded in ``P:orphans`` with the time its node
   vanished and unset once ``kill-orphans-after`` has passed (its run then
   completes and the task is forgotten: killing the live run is not done yet).

It streams: the nodes are held (they are few), tasks are derived and
compared with Redis a batch at a time (HMGET of ``P:tasks``, HSCAN of it).
Every change is logged. Only one reconciler runs at a time: it holds
``P:nodes:reconciler`` (SET NX PX, renewed before each batch of writes and
released with WATCH/MULTI; not a fence: the scripts do not check it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from .api import Redbike
from .nodeconfig import Family, NodeConfig
from .nodes import INSTANCE, WORKER, Forest, Node, resource_at, task_id
from .resources import LOCAL_PREFIX, format_amounts
from .roundrobin import RoundRobin

log = logging.getLogger(__name__)

BATCH = 2000  # tasks derived, compared and set per round trip
LEASE_MS = 30_000  # the reconciler's lease; renewed at each pass
RENEW_AFTER = 5.0  # seconds: a batch of writes renews the lease if it was renewed longer ago
DETAILED = 100  # changes of one kind logged one by one per pass; the rest are counted


class Busy(Exception):
    """Another reconciler holds the lease (one line)."""


@dataclass
class Pass:
    """What one pass changed (task ids, resource names, node names)."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)  # orphans whose node came back
    capacities: list[str] = field(default_factory=list)
    nodes_added: list[str] = field(default_factory=list)
    nodes_removed: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # nodes left out, and why
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(v)} {k.replace('_', ' ')}" for k, v in vars(self).items() if v]
        return ", ".join(parts) or "nothing changed"


def needs_of(family: Family, path: list[Node]) -> dict[str, int]:
    """A task's needs: its family's per-level amounts on its node and every
    ancestor (``path``, top first; the instance node implied), and on the worker."""
    needs: dict[str, int] = {}
    for node in [Node(INSTANCE, INSTANCE), *path]:
        for resource, amount in family.needs.get(node.level, {}).items():
            needs[resource_at(resource, node.name)] = amount
    for resource, amount in family.needs.get(WORKER, {}).items():
        needs[LOCAL_PREFIX + resource] = amount
    return needs


def digest(family: Family, needs: dict[str, int]) -> str:
    """What a task was set with, in short: a change re-sets it."""
    text = "|".join((family.schedule, format_amounts(needs), family.misfire or "", str(family.retries)))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def plain(bike: Redbike, client: redis.Redis) -> Redbike:
    """``bike`` on ``client`` (a pipeline: its calls are batched) with the
    base worker: a task's queue is the one in its id (the default
    queue_for), and its needs are the family's (no needs() hook)."""
    return Redbike(RoundRobin(), prefix=bike.keys.prefix, client=client, clock=bike.clock, timefile=bike.timefile,
                   misfire=bike.misfire, retries=bike.retries, retry=bike.retry_backoff, retention=bike.retention)


class Reconciler:
    """One installation's reconciliation, driven by a Redbike (its client, keys, clock, policy)."""

    def __init__(self, bike: Redbike, config: NodeConfig, batch: int = BATCH) -> None:
        self.bike = plain(bike, bike.client)
        self.config = config
        self.keys = bike.keys
        self.client = bike.client
        self.batch = batch
        self.token = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.renewed = float("-inf")  # monotonic time the lease was last taken or renewed

    # ------------------------------------------------------------ the lease

    def acquire(self) -> bool:
        """Take (or renew) the reconciler's lease; False if another holds it."""
        started = time.monotonic()
        if self.client.set(self.keys.reconciler, self.token, nx=True, px=LEASE_MS) or \
                self._if_mine(lambda pipe: pipe.pexpire(self.keys.reconciler, LEASE_MS)):
            self.renewed = started
            return True
        return False

    def keep_lease(self) -> None:
        """Renew the lease before a batch of writes (a long pass, a slow
        source) if it was renewed more than RENEW_AFTER seconds ago (it then
        has 25 s left at least: a batch takes far less); Busy if another
        reconciler took it meanwhile."""
        if time.monotonic() - self.renewed < RENEW_AFTER:
            return
        if not self.acquire():
            raise Busy(f"lost the reconciler lease to {self.holder()}; this pass stops here")

    def release(self) -> None:
        self.renewed = float("-inf")
        self._if_mine(lambda pipe: pipe.delete(self.keys.reconciler))

    def holder(self) -> str | None:
        holder: str | None = self.client.get(self.keys.reconciler)  # type: ignore[assignment]
        return holder

    def _if_mine(self, act: Callable[[Any], object]) -> bool:
        """Run ``act(pipe)`` in a transaction if the lease is still this reconciler's."""
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(self.keys.reconciler)
                if pipe.get(self.keys.reconciler) != self.token:
                    return False
                pipe.multi()
                act(pipe)
                pipe.execute()
                return True
            except redis.WatchError:
                return False

    # ------------------------------------------------------------ the reads

    def stored_nodes(self) -> dict[str, list[Node]]:
        """The nodes of the last pass, by source (P:nodes)."""
        nodes: dict[str, list[Node]] = {}
        for name, record in self.client.hscan_iter(self.keys.nodes, count=1000):
            node = Node.decode(name, record)
            nodes.setdefault(node.source, []).append(node)
        return nodes

    # ------------------------------------------------------------ a pass

    def reconcile(self, nodes: list[Node], now: float | None = None) -> Pass:
        """One pass: capacities, nodes, tasks (see the module's doc). It takes
        or renews the lease before each batch of writes (Busy if another
        reconciler holds it) and keeps it; :meth:`release` gives it back."""
        self.keep_lease()
        now = self.bike.clock() if now is None else now
        done = Pass()
        forest = Forest(nodes, self.config.parent_level)
        done.dropped = forest.dropped
        for why in forest.dropped:
            log.warning("node left out: %s", why)
        # Capacities before P:nodes: a pass cut short still finds the vanished nodes next time.
        removed = [Node.decode(name, record) for name, record in self.client.hscan_iter(self.keys.nodes, count=1000)
                   if name not in forest.nodes]
        self._capacities(forest, removed, done)
        self._store_nodes(forest, removed, done)
        self._add_tasks(forest, done)
        self._remove_tasks(forest, now, done)
        log.info("reconciled %d nodes: %s", len(forest), done.summary())
        return done

    def _store_nodes(self, forest: Forest, removed: list[Node], done: Pass) -> None:
        """P:nodes := the forest (``removed``: the stored nodes not in it)."""
        names = list(forest.nodes)
        for start in range(0, len(names), self.batch):
            chunk = names[start:start + self.batch]
            stored = self.client.hmget(self.keys.nodes, chunk)
            fresh: dict[Any, str] = {name: forest.nodes[name].encode() for name, old in zip(chunk, stored, strict=True)
                     if old != forest.nodes[name].encode()}
            done.nodes_added.extend(name for name, old in zip(chunk, stored, strict=True) if old is None)
            if fresh:
                self.client.hset(self.keys.nodes, mapping=fresh)
        for start in range(0, len(removed), self.batch):
            self.client.hdel(self.keys.nodes, *[node.name for node in removed[start:start + self.batch]])
        done.nodes_removed = [node.name for node in removed]
        for name in done.nodes_added[:DETAILED]:
            node = forest.nodes[name]
            log.info("node %s (%s, parent %s) added by source %s", name, node.level, node.parent, node.source)
        for node in removed[:DETAILED]:
            log.info("node %s (%s) is gone from source %s", node.name, node.level, node.source or "?")

    def _wanted_capacities(self, node: Node) -> dict[str, int | None]:
        wanted = dict(self.config.capacities.get(node.level, {}))
        wanted.update(self.config.overrides.get(node.name, {}))
        return {resource_at(resource, node.name): capacity for resource, capacity in wanted.items()}

    def _capacities(self, forest: Forest, removed: list[Node], done: Pass) -> None:
        """Per-node capacities as configured; those of vanished nodes unlimited."""
        every: list[tuple[str, int | None]] = []
        for node in [Node(INSTANCE, INSTANCE), *forest]:
            every.extend(self._wanted_capacities(node).items())
        for node in removed:
            every.extend((name, None) for name in self._wanted_capacities(node))
        for start in range(0, len(every), self.batch):
            chunk = every[start:start + self.batch]
            stored = self.client.hmget(self.keys.capacities, [name for name, _ in chunk])
            changed = [(name, capacity, old) for (name, capacity), old in zip(chunk, stored, strict=True)
                       if (None if old is None else int(old)) != capacity]
            if not changed:
                continue
            self.keep_lease()
            self.bike.set_capacities((name, capacity) for name, capacity, _ in changed)  # one round trip
            for name, capacity, old in changed:
                done.capacities.append(name)
                if len(done.capacities) <= DETAILED:
                    log.info("capacity of %s: %s -> %s", name, "none" if old is None else old,
                             "none" if capacity is None else capacity)

    def _wanted(self, forest: Forest) -> Iterator[tuple[str, Family, Node, dict[str, int]]]:
        """(task id, family, node, needs) of every task the nodes want, one at a time."""
        by_level: dict[str, list[Family]] = {}
        for family in self.config.families.values():
            by_level.setdefault(family.level, []).append(family)
        for node in forest:
            families = by_level.get(node.level)
            if not families:
                continue
            path = forest.path(node)
            for family in families:
                yield task_id(family.name, [n.name for n in path], family.queue), family, node, needs_of(family, path)

    def _add_tasks(self, forest: Forest, done: Pass) -> None:
        batch: list[tuple[str, Family, Node, dict[str, int]]] = []
        for wanted in self._wanted(forest):
            batch.append(wanted)
            if len(batch) >= self.batch:
                self._add_batch(batch, done)
                batch = []
        if batch:
            self._add_batch(batch, done)

    def _add_batch(self, batch: list[tuple[str, Family, Node, dict[str, int]]], done: Pass) -> None:
        self.keep_lease()
        ids = [taskid for taskid, *_ in batch]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.tasks, ids)
            pipe.hmget(self.keys.orphans, ids)
            stored, orphaned = pipe.execute()
        records: dict[Any, str] = {}
        adopted = [taskid for taskid, since in zip(ids, orphaned, strict=True) if since is not None]
        new: list[tuple[str, Family, dict[str, int]]] = []
        for (taskid, family, node, needs), old in zip(batch, stored, strict=True):
            record = f"{family.name}|{node.name}|{digest(family, needs)}"
            if old == record:
                continue
            records[taskid] = record
            if old is None:
                new.append((taskid, family, needs))
                continue
            # Changed: set one by one, so that set reads what the task had (the occurrences it cancels).
            try:
                self.bike.set(taskid, family.schedule, needs=needs, misfire=family.misfire, retries=family.retries)
            except ValueError as exc:
                del records[taskid]  # not recorded: the next pass tries again
                done.errors.append(f"{taskid}: {exc}")
                log.error("task %s: could not be set again: %s", taskid, exc)
                continue
            done.changed.append(taskid)
            log.info("task %s set again: family %s or its node's path changed", taskid, family.name)
        for taskid in self._set_new(new, done) if new else ():
            del records[taskid]  # not recorded: the next pass tries again
        with self.client.pipeline(transaction=False) as pipe:
            if records:
                pipe.hset(self.keys.tasks, mapping=records)
            if adopted:
                pipe.hdel(self.keys.orphans, *adopted)
            pipe.execute()
        for taskid in adopted:
            done.adopted.append(taskid)
            log.info("task %s: its node is back; no longer an orphan", taskid)

    def _set_new(self, new: list[tuple[str, Family, dict[str, int]]], done: Pass) -> set[str]:
        """Set new tasks in one pipelined batch (set_many: set.lua, as `redbike
        set` does); the ids of those that could not be set."""
        rows = [(taskid, family.schedule, format_amounts(needs), family.misfire or "",
                 "" if family.retries is None else str(family.retries)) for taskid, family, needs in new]
        with self.client.pipeline(transaction=False) as pipe:
            refused = plain(self.bike, pipe).set_many(rows)  # a bad row is not queued
            results = pipe.execute(raise_on_error=False)
        failed = {taskid for taskid, *_ in new if any(line.startswith(f"{taskid}: ") for line in refused)}
        done.errors.extend(refused)
        queued = [(taskid, family) for taskid, family, _ in new if taskid not in failed]
        for (taskid, family), result in zip(queued, results, strict=True):
            if isinstance(result, Exception):
                failed.add(taskid)
                done.errors.append(f"{taskid}: {result}")
                log.error("task %s: could not be set: %s", taskid, result)
                continue
            done.added.append(taskid)
            if len(done.added) <= DETAILED:
                log.info("task %s added (family %s, schedule %r): %s", taskid, family.name, family.schedule, result)
        for line in refused:
            log.error("task %s", line)
        return failed

    def _unwanted(self, forest: Forest, taskid: str, record: str) -> bool:
        family_name, node_name, _ = record.split("|", 2)
        family = self.config.families.get(family_name)
        node = forest.get(node_name)
        if family is None or node is None or node.level != family.level:
            return True
        return task_id(family.name, [n.name for n in forest.path(node)], family.queue) != taskid

    def _remove_tasks(self, forest: Forest, now: float, done: Pass) -> None:
        batch: list[str] = []
        for taskid, record in self.client.hscan_iter(self.keys.tasks, count=self.batch):
            if self._unwanted(forest, taskid, record):
                batch.append(taskid)
            if len(batch) >= self.batch:
                self._remove_batch(batch, now, done)
                batch = []
        if batch:
            self._remove_batch(batch, now, done)

    def _remove_batch(self, ids: list[str], now: float, done: Pass) -> None:
        self.keep_lease()
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.leases, ids)
            pipe.hmget(self.keys.orphans, ids)
            leases, orphaned = pipe.execute()
        grace = self.config.kill_orphans_after
        going: list[str] = []
        newly: dict[Any, str] = {}
        for taskid, lease, since in zip(ids, leases, orphaned, strict=True):
            if lease is None:
                going.append(taskid)
                if len(done.removed) + len(going) <= DETAILED:
                    log.info("task %s removed: its node or family is gone", taskid)
            elif since is None:
                newly[taskid] = f"{now:.3f}"
                done.orphaned.append(taskid)
                log.info("task %s is running on a vanished node: orphaned, unset %s", taskid,
                         "never (kill-orphans-after = never)" if grace is None else f"after {grace:g} s")
            elif grace is not None and now - float(since) >= grace:
                going.append(taskid)
                log.info("task %s: orphaned %.0f s ago, past kill-orphans-after: unset (its run completes; "
                         "killing it is not done yet)", taskid, now - float(since))
        if newly:
            self.client.hset(self.keys.orphans, mapping=newly)
        gone = []
        for taskid, result in self.bike.unset_many(going).items():  # two round trips
            if isinstance(result, Exception):  # kept in P:tasks: the next pass tries again
                done.errors.append(f"{taskid}: {result}")
                log.error("task %s: could not be unset: %s", taskid, result)
                continue
            gone.append(taskid)
        done.removed.extend(gone)
        if gone:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.tasks, *gone)
                pipe.hdel(self.keys.orphans, *gone)
                pipe.execute()
