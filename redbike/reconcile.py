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
   and ``db_lock@db3``. A node with alternative parents (``replica_of``)
   gives its tasks one needs set per path to the root, the primary first
   (records.encode_alternatives: the claim takes the first with room).
   New tasks are set in pipelined batches;
4. removes the tasks no family and node want any more: unset at once; a
   running one (its run completes, and it does not start again) is also
   recorded in ``P:orphans`` with the time its node vanished, and forgotten
   once its run ended or ``kill-orphans-after`` has passed (then its run is
   ended, revoke.lua, and its worker kills it), or set again if its node
   comes back first.

A pass after one that ended without errors under the same config (the
digest in ``P:nodes:reconciled``) looks only at the nodes whose records
changed and those under them; otherwise it is whole (see reconcile()).
It streams: the nodes are held, tasks are derived and compared with Redis
a batch at a time (HMGET of ``P:tasks``; a whole pass also HSCANs it), and
each batch is written in a few pipelined round trips, by writer threads
while the next batch is derived.
Every change is logged. Only one reconciler runs at a time: it holds
``P:nodes:reconciler`` (SET NX PX, renewed before each batch of writes and
released with WATCH/MULTI; not a fence: the scripts do not check it).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from .api import Redbike
from .lease import KeyLease
from .nodeconfig import Family, NodeConfig, TaskNeeds, digest, needs_on_paths
from .nodes import INSTANCE, Forest, Node, resource_at, task_id, under
from .records import RecordError, decode_lease, error_record, lease_token
from .roundrobin import RoundRobin
from .states import FORGET

log = logging.getLogger(__name__)
T = TypeVar("T")

BATCH = 2000  # tasks derived, compared and set per round trip
WRITERS = 2  # batches of tasks sent at once, each by a thread of its own (on a connection of its own)
LEASE_MS = 30_000  # the reconciler's lease; renewed at each pass
WHOLE_EVERY = 600.0  # seconds: a reconciler's passes are whole at least this often (see reconcile())
RENEW_AFTER = 5.0  # seconds: a batch of writes renews the lease if it was renewed longer ago
DETAILED = 100  # changes of one kind logged one by one per pass; the rest are counted


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), one at a time."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


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

    whole: bool = True  # a whole pass, or one that looked at the changed nodes only

    def summary(self) -> str:
        parts = [f"{len(v)} {k.replace('_', ' ')}" for k, v in vars(self).items() if v and isinstance(v, list)]
        return ", ".join(parts) or "nothing changed"


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
        self.lease = KeyLease(self.client, self.keys.reconciler, LEASE_MS)
        self.token = self.lease.token
        self.renewed = float("-inf")  # monotonic time the lease was last taken or renewed
        self.renewing = threading.Lock()
        self.whole_at = time.monotonic()  # of the last whole pass (a new reconciler trusts the mark)
        self.read_nodes: dict[str, str] | None = None  # P:nodes as stored_nodes() read it, for the next pass

    # ------------------------------------------------------------ the lease

    def acquire(self) -> bool:
        """Take (or renew) the reconciler's lease; False if another holds it."""
        started = time.monotonic()
        if self.lease.acquire():
            self.renewed = started
            return True
        return False

    def keep_lease(self) -> None:
        """Renew the lease before a batch of writes (a long pass, a slow
        source) if it was renewed more than RENEW_AFTER seconds ago (it then
        has 25 s left at least: a batch takes far less); Busy if another
        reconciler took it meanwhile."""
        with self.renewing:  # the writer threads renew it one at a time (WATCH would fail the other)
            if time.monotonic() - self.renewed < RENEW_AFTER or self.acquire():
                return
            raise Busy(f"lost the reconciler lease to {self.holder()}; this pass stops here")

    def release(self) -> None:
        self.renewed = float("-inf")
        self.lease.release()

    def holder(self) -> str | None:
        return self.lease.holder()

    # ------------------------------------------------------------ the reads

    def stored_nodes(self) -> dict[str, list[Node]]:
        """The nodes of the last pass, by source (P:nodes). The next pass
        uses the records read here instead of reading them again (the lease
        is held meanwhile: reconcile_once, a loop that just took it)."""
        self.read_nodes = dict(self.client.hscan_iter(self.keys.nodes, count=1000))
        nodes: dict[str, list[Node]] = {}
        for name, record in self.read_nodes.items():
            node = Node.decode(name, record)
            nodes.setdefault(node.source, []).append(node)
        return nodes

    # ------------------------------------------------------------ a pass

    def reconcile(self, nodes: list[Node], now: float | None = None, whole: bool = False) -> Pass:
        """One pass: capacities, nodes, tasks (see the module's doc). It takes
        or renews the lease before each batch of writes (Busy if another
        reconciler holds it) and keeps it; :meth:`release` gives it back.

        A pass looks only at the nodes that changed since the last pass
        (their records in P:nodes; a node under a changed one changes path),
        unless ``whole``, or the last pass did not end without errors under
        this same config (P:nodes:reconciled), or the last whole pass of this
        reconciler is WHOLE_EVERY seconds old: then it derives and compares
        every task and every capacity, and scans P:tasks for tasks to remove."""
        self.keep_lease()
        now = self.bike.clock() if now is None else now
        done = Pass()
        forest = Forest(nodes, self.config.parent_level)
        done.dropped = forest.dropped
        for why in forest.dropped:
            log.warning("left out: %s", why)  # a node, or an alternative parent of one
        stored = self.read_nodes if self.read_nodes is not None else dict(
            self.client.hscan_iter(self.keys.nodes, count=1000))
        self.read_nodes = None
        encoded = {name: node.encode() for name, node in forest.nodes.items()}
        removed = [Node.decode(name, record) for name, record in stored.items() if name not in forest.nodes]
        mark = self._mark()
        done.whole = whole = (whole or time.monotonic() - self.whole_at >= WHOLE_EVERY
                              or self.client.get(self.keys.reconciled) != mark)
        self.client.delete(self.keys.reconciled)  # a pass cut short leaves none: the next one is whole
        touched = None
        changed = [name for name, record in encoded.items() if stored.get(name) != record]  # new or changed
        if not whole:
            inner = self.inner
            touched = under(set(changed), forest.nodes, lambda name: forest.nodes[name].parent,
                            lambda name: forest.nodes[name].level not in inner)
            # Replicas: a node whose alternative parent came, went or changed
            # has other paths (and so have the nodes under it), its record unchanged.
            gone = {node.name for node in removed}
            while forest.replicating and (more := forest.replicas_of(touched | gone) - touched):
                touched |= under(more, forest.nodes, lambda name: forest.nodes[name].parent,
                                 lambda name: forest.nodes[name].level not in inner)
        # Capacities before P:nodes: a pass cut short still finds the vanished nodes next time.
        self._capacities(forest, removed, done, touched)
        self._store_nodes(forest, stored, [(name, encoded[name]) for name in changed], removed, done)
        self._add_tasks(forest, done, touched)
        if whole:
            self._remove_tasks(forest, now, done)
            self.whole_at = time.monotonic()
        else:
            self._remove_moved(forest, stored, encoded, now, done)
        if not done.errors:
            self.client.set(self.keys.reconciled, mark)
        log.info("reconciled %d nodes (%s pass): %s", len(forest), "whole" if whole else "changes only",
                 done.summary())
        return done

    @property
    def inner(self) -> set[str]:
        """The levels other levels hang from."""
        return set(self.config.parent_level.values())

    def _mark(self) -> str:
        """What the tasks and capacities derive from besides the nodes (the config)."""
        config = self.config
        text = repr((sorted(config.parent_level.items()), sorted(config.capacities.items()),
                     sorted(config.overrides.items()), sorted(config.families.items())))
        return hashlib.sha1(text.encode()).hexdigest()

    def _store_nodes(self, forest: Forest, stored: dict[str, str], fresh: list[tuple[str, str]], removed: list[Node],
                     done: Pass) -> None:
        """P:nodes := the forest (``stored``: what it holds; ``fresh``: the
        records of the forest's nodes that are new or changed; ``removed``:
        the stored nodes not in it)."""
        for start in range(0, len(fresh), self.batch):
            self.client.hset(self.keys.nodes, mapping=dict(fresh[start:start + self.batch]))
        done.nodes_added = [name for name, _ in fresh if name not in stored]
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

    def _capacities(self, forest: Forest, removed: list[Node], done: Pass, touched: set[str] | None) -> None:
        """Per-node capacities as configured (of the ``touched`` nodes only,
        and the instance's, unless None); those of vanished nodes unlimited."""
        every: list[tuple[str, int | None]] = []
        nodes = forest if touched is None else (forest.nodes[name] for name in touched)
        for node in [Node(INSTANCE, INSTANCE), *nodes]:
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

    def _by_level(self) -> dict[str, list[Family]]:
        by_level: dict[str, list[Family]] = {}
        for family in self.config.families.values():
            by_level.setdefault(family.level, []).append(family)
        return by_level

    def _wanted(self, forest: Forest, touched: set[str] | None) -> Iterator[tuple[str, Family, Node, TaskNeeds]]:
        """(task id, family, node, needs) of every task the nodes want (those
        of the ``touched`` nodes, unless None), one at a time."""
        by_level = self._by_level()
        for node in forest if touched is None else (forest.nodes[name] for name in touched):
            families = by_level.get(node.level)
            if not families:
                continue
            paths = forest.paths(node)  # [its path], or one per parent (replicas), the primary first
            for family in families:
                yield (task_id(family.name, [n.name for n in paths[0]], family.queue), family, node,
                       needs_on_paths(family, paths))

    def _add_tasks(self, forest: Forest, done: Pass, touched: set[str] | None) -> None:
        """Compare and set the wanted tasks a batch at a time; WRITERS threads
        send batches while the next is derived (Redis runs the scripts of one
        while Python builds another: a full load takes about the longer of
        the two, not their sum)."""
        with ThreadPoolExecutor(WRITERS, thread_name_prefix="redbike-reconcile") as writers:
            sending: deque[Future[None]] = deque()
            for batch in chunks(self._wanted(forest, touched), self.batch):
                if len(sending) >= WRITERS:
                    sending.popleft().result()  # its errors (Busy, Redis) stop the pass here
                sending.append(writers.submit(self._add_batch, batch, done))
            while sending:
                sending.popleft().result()

    def _add_batch(self, batch: list[tuple[str, Family, Node, TaskNeeds]], done: Pass) -> None:
        self.keep_lease()
        ids = [taskid for taskid, *_ in batch]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.tasks, ids)
            pipe.hmget(self.keys.orphans, ids)
            stored, orphaned = pipe.execute()
        records: dict[Any, str] = {}
        adopted = [taskid for taskid, since in zip(ids, orphaned, strict=True) if since is not None]
        new: list[tuple[str, Family, TaskNeeds]] = []
        for (taskid, family, node, needs), old in zip(batch, stored, strict=True):
            record = f"{family.name}|{node.name}|{digest(family, needs)}"
            if old == record and taskid not in adopted:
                continue
            records[taskid] = record
            if old is None:
                new.append((taskid, family, needs))
                continue
            # Changed, or adopted (unset when orphaned): set one by one, so
            # that set reads what the task had (the occurrences it cancels).
            try:
                self.bike.set(taskid, family.schedule, needs=needs, misfire=family.misfire, retries=family.retries)
            except ValueError as exc:
                del records[taskid]  # not recorded: the next pass tries again
                if taskid in adopted:
                    adopted.remove(taskid)  # still an orphan
                done.errors.append(f"{taskid}: {exc}")
                log.error("task %s: could not be set again: %s", taskid, exc)
                continue
            if old == record:
                continue  # adopted, logged below
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
            log.info("task %s: its node is back; no longer an orphan, set again", taskid)

    def _set_new(self, new: list[tuple[str, Family, TaskNeeds]], done: Pass) -> set[str]:
        """Set new tasks, one round trip per family (set_alike: set.lua, as
        `redbike set` runs it; the schedule parsed and placed once); the ids
        of those that could not be set."""
        by_family: dict[str, list[tuple[str, Family, TaskNeeds]]] = {}
        for task in new:
            by_family.setdefault(task[1].name, []).append(task)
        failed: set[str] = set()
        for tasks in by_family.values():
            family = tasks[0][1]
            try:
                results = self.bike.set_alike([(taskid, needs) for taskid, _, needs in tasks], family.schedule,
                                              misfire=family.misfire, retries=family.retries)
            except ValueError as exc:  # the family's schedule or policy (checked with the config)
                results = {taskid: exc for taskid, *_ in tasks}
            for taskid, result in results.items():
                if isinstance(result, Exception):
                    failed.add(taskid)
                    done.errors.append(f"{taskid}: {result}")
                    log.error("task %s: could not be set: %s", taskid, result)
                    continue
                done.added.append(taskid)
                if len(done.added) <= DETAILED:
                    log.info("task %s added (family %s, schedule %r): %s", taskid, family.name, family.schedule,
                             result)
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

    def _remove_moved(self, forest: Forest, stored: dict[str, str], encoded: dict[str, str], now: float,
                      done: Pass) -> None:
        """Remove the tasks no longer wanted among those of the stored nodes
        that vanished or changed (and of the nodes under them: their paths
        changed), as they were, and the orphans (their grace may be over)."""

        def parent(name: str) -> str:
            record = stored.get(name)
            return record.split("|", 2)[1] if record is not None else INSTANCE

        inner = self.inner
        moved = under({name for name, record in stored.items() if encoded.get(name) != record}, stored, parent,
                      lambda name: stored[name].split("|", 1)[0] not in inner)
        by_level = self._by_level()
        candidates: dict[str, None] = {}
        for name in moved & stored.keys():
            families = by_level.get(stored[name].split("|", 1)[0], ())
            if families:
                path = [name]
                while parent(path[-1]) != INSTANCE:
                    path.append(parent(path[-1]))
                candidates.update((task_id(family.name, path[::-1], family.queue), None) for family in families)
        candidates.update((str(taskid), None) for taskid in self.client.hkeys(self.keys.orphans))
        ids = list(candidates)
        for start in range(0, len(ids), self.batch):
            chunk = ids[start:start + self.batch]
            records = self.client.hmget(self.keys.tasks, chunk)
            unwanted = [taskid for taskid, record in zip(chunk, records, strict=True)
                        if record is not None and self._unwanted(forest, taskid, str(record))]
            if unwanted:
                self._remove_batch(unwanted, now, done)

    def end_runs(self, orphans: dict[str, tuple[str, float]], now: float) -> None:
        """End the runs of orphans past kill-orphans-after (revoke.lua): their
        leases go, what they hold is released, and each worker's heartbeat,
        finding its lease gone, kills the run."""
        index: dict[str, int] = {}
        args: list[Any] = []
        for taskid, (lease, orphaned) in orphans.items():
            try:
                held = decode_lease(lease)
                token, queue, worker = held.token, held.queue, held.worker
            except RecordError:  # still ended: the token is all the script needs
                token, queue, worker = lease_token(lease), self.bike.worker.queue_for(taskid), "?"
            reason = (f"killed: its node vanished {orphaned:.0f} s ago, more than kill-orphans-after "
                      f"({self.config.kill_orphans_after:g} s)")
            args += [taskid, token, FORGET.script_arg, error_record("EXP", reason, worker, now),
                     index.setdefault(queue, len(index) + 1)]
        keys = [self.keys.queue(name) for name in index]
        channels = [self.keys.queue_channel(name) for name in index]
        ended = self.bike.scripts.run("revoke", now, keys, [len(index), *channels, *args])
        for taskid in ended:
            log.info("task %s: orphaned %.0f s ago, past kill-orphans-after: its run ended (its worker kills it) "
                     "and it is forgotten", taskid, orphans[taskid][1])

    def _remove_batch(self, ids: list[str], now: float, done: Pass) -> None:
        self.keep_lease()
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hmget(self.keys.leases, ids)
            pipe.hmget(self.keys.orphans, ids)
            leases, orphaned = pipe.execute()
        grace = self.config.kill_orphans_after
        going: list[str] = []  # unset and forgotten
        newly: dict[Any, str] = {}  # orphaned: unset now (its run completes; it does not start again)
        past: list[str] = []  # orphans past their grace: forgotten (unset when orphaned), their runs ended
        killing: dict[str, tuple[str, float]] = {}  # those: their lease, and how long they have been orphans
        for taskid, lease, since in zip(ids, leases, orphaned, strict=True):
            if lease is None:
                going.append(taskid)
                if len(done.removed) + len(going) <= DETAILED:
                    log.info("task %s removed: its node or family is gone", taskid)
            elif since is None:
                newly[taskid] = f"{now:.3f}"
            elif grace is not None and now - float(since) >= grace:
                past.append(taskid)
                killing[taskid] = (lease, now - float(since))
        gone = []
        for taskid, result in self.bike.unset_many([*going, *newly]).items():  # two round trips
            if isinstance(result, Exception):  # kept in P:tasks: the next pass tries again
                newly.pop(taskid, None)
                done.errors.append(f"{taskid}: {result}")
                log.error("task %s: could not be unset: %s", taskid, result)
            elif taskid not in newly:
                gone.append(taskid)
        for taskid in newly:
            done.orphaned.append(taskid)
            log.info("task %s is running on a vanished node: orphaned and unset (its run completes, and it "
                     "does not start again); forgotten %s", taskid,
                     "when its run ends (kill-orphans-after = never)" if grace is None else f"after {grace:g} s")
        if newly:
            self.client.hset(self.keys.orphans, mapping=newly)
        if killing:
            self.end_runs(killing, now)
        gone.extend(past)
        done.removed.extend(gone)
        if gone:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hdel(self.keys.tasks, *gone)
                pipe.hdel(self.keys.orphans, *gone)
                pipe.execute()
