"""The node model's names and shapes: nodes, the forest they form, task ids
and per-node resource names (issue #9, Bistro's node model).

A node has a level (``host``, ``db``), a name unique across all levels, a
parent on its level's parent level, and optional attributes. The implicit
root level ``instance`` has one node, ``instance``, the parent of every node
of a top level. A task is one job family run on one node; its id is the
family, the names on the node's path below the instance, and the family's
queue: ``scan/db-host-17/db3:batch``. A per-node resource is a level's
resource name and the node's name: ``host_concurrency@db-host-17``.
A node may name alternative parents (replicas: ``replica_of``), giving it
one path to the root per parent (Forest.paths).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .names import CONTROL
from .records import MAX_PATHS

INSTANCE = "instance"  # the root level, and the name of its one node
WORKER = "worker"  # the implicit level of worker pools: their `--resources` (worker:NAME)
AT = "@"  # resource@node
PATH_SEP = "/"  # family/node/.../leaf
REPLICA_OF = "replica_of"  # the attribute naming a node's alternative parents
# Between the names of replica_of: ";" (the CSV attribute syntax,
# ``replica_of=db-host-18;db-host-19``) or whitespace.
_REPLICA_SEP = re.compile(r"[;\s]+")
# Node names go into job ids (split on "/" and the last ":"), resource names
# (no whitespace, "|", ",", "="; split on "@") and stored records ("|").
_NODE_NAME = re.compile(r"[^\s|,=/:@]+")
# A node name with none of names.CONTROL in it either: what check_node_name accepts.
NODE_NAME_TEXT = r"[^\s|,=/:@\x00-\x1f\x7f-\x9f]+"


NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})  # most nodes have none: one shared, not a dict each


class NodeError(ValueError):
    """A node that cannot be used (one line for the user)."""


def check_node_name(name: object, what: str = "node name") -> str:
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name) or CONTROL.search(name):
        raise NodeError(f"bad {what} {name!r}: no spaces, control characters, '|', ',', '=', '/', ':' or '@'")
    return name


@dataclass(slots=True)
class Node:
    """One node: its level, name, parent (``instance`` for a top level's) and
    attributes. Never changed once made, but for its source, set once by
    the loader on the nodes a fetch made (not frozen only because a frozen
    dataclass takes four times as long to make, and a pass makes a few for
    each of 100,000 nodes)."""

    level: str
    name: str
    parent: str = INSTANCE
    attributes: Mapping[str, str] = field(default_factory=lambda: NO_ATTRIBUTES)
    source: str = ""  # the source that gave it

    def encode(self) -> str:
        """The stored record (``P:nodes`` hash value): ``level|parent|source|attributes-JSON``."""
        attributes = json.dumps(dict(self.attributes), sort_keys=True) if self.attributes else "{}"  # most have none
        return f"{self.level}|{self.parent}|{self.source}|{attributes}"

    @classmethod
    def decode(cls, name: str, record: str) -> Node:
        level, parent, source, attributes = record.split("|", 3)
        return cls(level, name, parent, json.loads(attributes) if attributes != "{}" else NO_ATTRIBUTES, source)

    @property
    def replica_of(self) -> list[str]:
        """The alternative parents its ``replica_of`` attribute names, in order
        (unchecked: :class:`Forest` keeps those that are nodes of its parent level)."""
        text = self.attributes.get(REPLICA_OF, "")
        return list(dict.fromkeys(filter(None, _REPLICA_SEP.split(text)))) if text else []


def resource_at(resource: str, node: str) -> str:
    """The per-node resource: ``host_concurrency@db-host-17``."""
    return f"{resource}{AT}{node}"


def task_id(family: str, path: Iterable[str], queue: str) -> str:
    """A task's stable id: ``family/name/.../leaf:queue`` (``path``: the node's
    path from below the instance down to it)."""
    return f"{family}{PATH_SEP}{PATH_SEP.join(path)}:{queue}"


def task_parts(taskid: str) -> tuple[str, list[str], str]:
    """(family, path, queue) of a task id built by :func:`task_id`."""
    body, _, queue = taskid.rpartition(":")
    family, *path = body.split(PATH_SEP)
    return family, path, queue


class Forest:
    """The nodes of all sources, indexed by name, with their paths to the root.

    Built from whole node lists; a node whose parent is missing or on the
    wrong level, or whose name was already given, is left out (``dropped``
    says why), so one bad row does not stop the others.

    Replicas: a node may name alternative parents (``replica_of``), nodes of
    its parent level like its parent; one that is not (unknown, on another
    level, the node's own parent, or a top level's node: it has none) is
    left out with a line in ``dropped``, the node kept. As every parent is on
    the level above its child's, the graph they make has no cycle. A node's
    paths to the root (:meth:`paths`) go through each of its parents in
    turn, the primary first.
    """

    def __init__(self, nodes: Iterable[Node], parent_level: Mapping[str, str]) -> None:
        self.parent_level = parent_level
        self.nodes: dict[str, Node] = {}
        self.dropped: list[str] = []
        for node in nodes:
            if node.name in self.nodes or node.name == INSTANCE:
                self.dropped.append(f"{node.level} {node.name}: the name is given twice")
            elif node.level not in parent_level:
                self.dropped.append(f"{node.level} {node.name}: unknown level {node.level!r}")
            else:
                self.nodes[node.name] = node
        # A node hangs from the forest only if its whole path does: drop the
        # others (and, a pass later, their children).
        changed = True
        while changed:
            changed = False
            for name, node in list(self.nodes.items()):
                problem = self._parent_problem(node)
                if problem:
                    self.dropped.append(f"{node.level} {name}: {problem}")
                    del self.nodes[name]
                    changed = True
        # Alternative parents, once the forest is settled: a node's parents
        # are all there (those dropped above are left out here too).
        self.alternates: dict[str, list[str]] = {}
        self.replicating = [name for name, node in self.nodes.items() if node.attributes and node.replica_of]
        for name in self.replicating:
            node = self.nodes[name]
            kept = [parent for parent in node.replica_of if self._alternate_ok(node, parent)]
            if kept:
                self.alternates[name] = kept

    def _alternate_ok(self, node: Node, parent: str) -> bool:
        wanted = self.parent_level[node.level]
        found = self.nodes.get(parent)
        if parent == node.parent:
            problem = "is its parent already"
        elif wanted == INSTANCE:
            problem = f"cannot be: level {node.level} is a top level"
        elif found is None:
            problem = "is not a node"
        elif found.level != wanted:
            problem = f"is a {found.level}, not a {wanted}"
        else:
            return True
        self.dropped.append(f"{node.level} {node.name}: its alternative parent {parent!r} {problem}; left out")
        return False

    def _parent_problem(self, node: Node) -> str:
        wanted = self.parent_level[node.level]
        if wanted == INSTANCE:
            return "" if node.parent == INSTANCE else f"level {node.level} is a top level; its parent must be empty"
        parent = self.nodes.get(node.parent)
        if parent is None:
            return f"its parent {node.parent!r} is not a node"
        if parent.level != wanted:
            return f"its parent {node.parent!r} is a {parent.level}, not a {wanted}"
        return ""

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def get(self, name: str) -> Node | None:
        return self.nodes.get(name)

    def path(self, node: Node) -> list[Node]:
        """The node's path from below the instance down to it (top first)."""
        path = [node]
        while path[-1].parent != INSTANCE:
            path.append(self.nodes[path[-1].parent])
        return path[::-1]

    def paths(self, node: Node) -> list[list[Node]]:
        """Every path from below the instance down to the node, through its
        parents and their alternatives (replicas), each top first: depth
        first, a node's primary parent before its alternatives (so the
        first is :meth:`path`); the first MAX_PATHS of them."""
        if not self.alternates:
            return [self.path(node)]
        if node.parent == INSTANCE:
            return [[node]]
        found: list[list[Node]] = []
        for parent in [node.parent, *self.alternates.get(node.name, ())]:
            for above in self.paths(self.nodes[parent]):
                found.append([*above, node])
                if len(found) == MAX_PATHS:
                    return found
        return found

    def replicas_of(self, names: set[str]) -> set[str]:
        """The nodes whose ``replica_of`` names one of ``names`` (kept or not:
        a parent that came or went changes their paths)."""
        return {name for name in self.replicating if not names.isdisjoint(self.nodes[name].replica_of)}


def under(changed: set[str], names: Iterable[str], parent: Callable[[str], str], leaf: Callable[[str], bool]) -> set[str]:
    """The ``names`` that are in ``changed`` or below one (``parent``: a
    name's parent's, INSTANCE at the top), each path walked once; just
    ``changed`` if each of them is a ``leaf`` (on a level no level hangs from)."""
    if all(leaf(name) for name in changed):
        return changed
    flags: dict[str, bool] = {}
    for name in names:
        chain = []
        while name != INSTANCE and name not in flags:
            chain.append(name)
            name = parent(name)
        flag = flags.get(name, False)
        for below in reversed(chain):
            flag = flag or below in changed
            flags[below] = flag
    return {name for name, flag in flags.items() if flag}
