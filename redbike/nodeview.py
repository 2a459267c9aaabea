"""Read-only views of the node model: ``redbike nodes`` and ``redbike node``.

They read what the reconciler stored (P:nodes, P:tasks, P:orphans) and the
job-state keys, and stream the tasks with HSCAN, so they need no config.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import redis

from .keys import Keys
from .nodes import AT, INSTANCE, PATH_SEP, Node
from .records import MAX_PATHS, RecordError, decode_lease, decode_needs

SCAN_COUNT = 1000


def _glob(text: str) -> str:
    """``text`` with Redis' glob characters escaped, for a MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _task_counts(client: redis.Redis, keys: Keys) -> tuple[Counter[str], Counter[str]]:
    """Tasks and running tasks per node, a batch of tasks at a time."""
    tasks: Counter[str] = Counter()
    running: Counter[str] = Counter()
    batch: list[tuple[str, str]] = []

    def count() -> None:
        leases = client.hmget(keys.leases, [taskid for taskid, _ in batch])
        for (_, node), lease in zip(batch, leases, strict=True):
            tasks[node] += 1
            running[node] += lease is not None
        batch.clear()

    for taskid, record in client.hscan_iter(keys.tasks, count=SCAN_COUNT):
        batch.append((taskid, record.split("|", 2)[1]))
        if len(batch) >= SCAN_COUNT:
            count()
    if batch:
        count()
    return tasks, running


def nodes(client: redis.Redis, keys: Keys, level: str | None = None) -> Iterator[tuple[str, str, str, int, int]]:
    """(level, name, parent, tasks, running) of every node (of ``level``), sorted by level and name."""
    tasks, running = _task_counts(client, keys)
    found = [Node.decode(name, record) for name, record in client.hscan_iter(keys.nodes, count=SCAN_COUNT)]
    for node in sorted(found, key=lambda n: (n.level, n.name)):
        if level is None or node.level == level:
            parent = "" if node.parent == INSTANCE else node.parent
            yield node.level, node.name, parent, tasks[node.name], running[node.name]


def _path(client: redis.Redis, keys: Keys, name: str) -> list[Node]:
    """The stored node and its ancestors, top first ([] if it is not stored)."""
    path: list[Node] = []
    while name != INSTANCE and len(path) < 100:  # bounded: a hand-edited P:nodes may loop
        record = client.hget(keys.nodes, name)
        if record is None:
            break
        path.append(Node.decode(name, str(record)))
        name = path[-1].parent
    return path[::-1]


def _shown(path: list[Node]) -> list[dict[str, str]]:
    return [{"level": INSTANCE, "name": INSTANCE}, *({"level": n.level, "name": n.name} for n in path)]


def _alternative_parents(client: redis.Redis, keys: Keys, node: Node) -> list[Node]:
    """The stored alternative parents of a node (replica_of): those stored
    on its parent's level (the reconciler left the others out)."""
    if not node.replica_of or node.parent == INSTANCE:
        return []
    names = [node.parent, *(name for name in node.replica_of if name != node.parent)]
    found = [Node.decode(name, str(record)) for name, record in zip(names, client.hmget(keys.nodes, names), strict=True)
             if record is not None]
    if not found or found[0].name != node.parent:
        return []
    return [parent for parent in found[1:] if parent.level == found[0].level]


def _paths(client: redis.Redis, keys: Keys, node: Node, depth: int = 0) -> list[list[Node]]:
    """Every path of a stored node, top first, through its parents and their
    alternatives, primary first, as nodes.Forest.paths orders them (the
    first MAX_PATHS)."""
    if node.parent == INSTANCE or depth >= 100:  # bounded: a hand-edited P:nodes may loop
        return [[node]]
    record = client.hget(keys.nodes, node.parent)
    if record is None:
        return [[node]]
    found: list[list[Node]] = []
    for parent in [Node.decode(node.parent, str(record)), *_alternative_parents(client, keys, node)]:
        for above in _paths(client, keys, parent, depth + 1):
            found.append([*above, node])
            if len(found) == MAX_PATHS:
                return found
    return found


def task_of(client: redis.Redis, keys: Keys, jobid: str) -> dict[str, Any] | None:
    """A task's family, node and path to the root (what `tell` adds); None
    for a job set by hand. A task of a node with alternative parents
    (replicas) also gets ``paths`` (each, the primary first) and, while it
    runs, ``path_taken``: the first of them on which its lease holds what it holds."""
    record = client.hget(keys.tasks, jobid)
    if record is None:
        return None
    family, node_name, _ = str(record).split("|", 2)
    path = _path(client, keys, node_name)
    told: dict[str, Any] = {"family": family, "node": node_name, "path": _shown(path)}
    orphaned = client.hget(keys.orphans, jobid)
    if orphaned is not None:
        told["orphaned_since"] = float(str(orphaned))
    if any(step.replica_of for step in path):
        paths = _paths(client, keys, path[-1])
        if len(paths) > 1:
            told["paths"] = [_shown(one) for one in paths]
            lease = client.hget(keys.leases, jobid)
            taken = _taken(paths, str(lease)) if lease is not None else None
            if taken is not None:
                told["path_taken"] = _shown(taken)
    return told


def _taken(paths: list[list[Node]], lease: str) -> list[Node] | None:
    """The first path with every node the lease holds a per-node resource of."""
    try:
        held = decode_lease(lease).needs
    except RecordError:
        return None
    nodes = {name.rpartition(AT)[2] for name in decode_needs(held) if AT in name} - {INSTANCE}
    return next((one for one in paths if nodes <= {n.name for n in one}), None)


def node(client: redis.Redis, keys: Keys, name: str) -> dict[str, Any] | None:
    """One node: its path to the root, the capacities and usage of its
    resources, and its tasks (status, running, orphaned since); None if unknown."""
    path = _path(client, keys, name)
    if not path:
        return None
    found = path[-1]
    pattern = f"*{AT}{_glob(name)}"
    capacities = {r: int(c) for r, c in client.hscan_iter(keys.capacities, match=pattern, count=SCAN_COUNT)}
    in_use = {r: int(u) for r, u in client.hscan_iter(keys.usage, match=pattern, count=SCAN_COUNT)}
    ids = sorted(taskid for taskid, _ in client.hscan_iter(keys.tasks, match=f"*{PATH_SEP}{_glob(name)}:*",
                                                           count=SCAN_COUNT))
    tasks = []
    if ids:
        with client.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.statuses, ids)
            pipe.hmget(keys.leases, ids)
            pipe.hmget(keys.orphans, ids)
            statuses, leases, orphaned = pipe.execute()
        for taskid, status, lease, since in zip(ids, statuses, leases, orphaned, strict=True):
            task: dict[str, Any] = {"id": taskid, "status": status, "running": lease is not None}
            if since is not None:
                task["orphaned_since"] = float(since)
            tasks.append(task)
    return {
        "name": found.name,
        "level": found.level,
        "parent": None if found.parent == INSTANCE else found.parent,
        "source": found.source,
        "attributes": dict(found.attributes),
        "alternative_parents": [parent.name for parent in _alternative_parents(client, keys, found)],
        "path": _shown(path),
        "capacities": capacities,
        "in_use": in_use,
        "tasks": tasks,
    }
