"""Node sources: where the nodes come from, each polled on its own interval.

Every source gives the whole current node list of the levels it knows:

- ``file PATH``: CSV rows ``level,name,parent[,k=v;k=v]`` (parent empty for a
  top level; ``#`` starts a comment line) or, for a ``.json`` file, a list of
  ``{"level", "name", "parent", "attributes"}`` objects; read again only when
  its modification time changes;
- ``script COMMAND``: any executable printing that CSV on stdout;
- ``http URL``: the work-queue source interface, ``GET URL`` answering
  ``{"kind": "ItemList", "apiVersion": "v1", "items": [node objects]}``;
- ``python module:function``: a function marked with :func:`node_source`
  returning nodes (:class:`Node`, ``(level, name, parent[, attributes])`` or
  node objects); the spec is parsed like a worker spec, never evaluated;
- ``time LEVEL PERIOD LIFETIME``: one node of the (top) level LEVEL per
  PERIOD seconds, named by its start (``20261201T150000Z``), kept LIFETIME
  seconds.

A source that fails (an error, a non-zero exit, garbage, the wrong kind)
keeps its last good list and its error is logged; so does one that returns
more than ``guard-fraction`` fewer nodes than its last good list (a broken
fetcher must not wipe a fleet's tasks). One failing source never stops the
others.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .nodeconfig import NodeConfig, SourceSpec
from .nodes import (
    INSTANCE,
    NO_ATTRIBUTES,
    NODE_NAME_TEXT,
    REPLICA_OF,
    Node,
    NodeError,
    check_node_name,
)
from .workerspec import WorkerSpecError, parse_spec

log = logging.getLogger(__name__)

SCRIPT_TIMEOUT = 300.0  # seconds a node script may run
HTTP_TIMEOUT = 30.0
MARK = "__redbike_node_source__"
F = TypeVar("F", bound=Callable[..., Any])


class SourceError(Exception):
    """A source that gave no usable node list this time (one line)."""


def node_source(function: F) -> F:
    """Mark ``function`` as a node source a ``python`` source may call: only
    marked functions are, so a spec cannot name ``os:system`` or the like."""
    setattr(function, MARK, True)
    return function


class Fetcher(Protocol):
    def fetch(self, now: float) -> list[Node] | None:
        """The source's whole node list; None: unchanged since the last fetch."""


# ----------------------------------------------------------------- formats


def _attributes(text: str, where: str) -> dict[str, str]:
    """``k=v;k2=v2``; after ``replica_of=a``, a part without ``=`` is one more
    alternative parent (``replica_of=a;b``)."""
    attributes: dict[str, str] = {}
    key = ""
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part and key == REPLICA_OF:
            attributes[key] += ";" + part
            continue
        key, has_value, value = part.partition("=")
        key = key.strip()
        if not has_value or not key:
            raise SourceError(f"{where}: bad attribute {part!r} (expected key=value)")
        attributes[key] = value.strip()
    return attributes


def node_of(level: object, name: object, parent: object, attributes: object, where: str) -> Node:
    """A node from its fields, checked (SourceError naming ``where``)."""
    try:
        check_node_name(level, "level")
        check_node_name(name)
        parent = parent or INSTANCE
        check_node_name(parent, "parent")
    except NodeError as exc:
        raise SourceError(f"{where}: {exc}") from None
    if isinstance(attributes, str):
        attributes = _attributes(attributes, where)
    if not isinstance(attributes, Mapping) or not all(isinstance(k, str) for k in attributes):
        raise SourceError(f"{where}: attributes must be an object of strings")
    # A list (JSON: "replica_of": ["h2", "h3"]) is kept as its items joined by ";", as CSV gives it.
    return Node(str(level), str(name), str(parent),
                {k: ";".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in attributes.items()})


# A row without quotes, attributes or spaces around its cells, its names
# good: most rows of a long list, read without the csv module and the checks
# (to read 100,000 rows takes a third of the time).
_PLAIN_ROW = re.compile(rf"(?!#)({NODE_NAME_TEXT}),({NODE_NAME_TEXT})(?:,({NODE_NAME_TEXT})?)?")


def parse_csv(text: str, where: str) -> list[Node]:
    """Nodes from ``level,name,parent[,k=v;...]`` rows (blank and ``#`` lines skipped)."""
    if '"' in text or "\r" in text:  # quoted cells (commas, line breaks), other line ends: the csv module
        return _parse_rows(csv.reader(io.StringIO(text)), where)
    nodes = []
    for number, line in enumerate(text.split("\n"), 1):
        plain = _PLAIN_ROW.fullmatch(line)
        if plain:
            level, name, parent = plain.groups()
            nodes.append(Node(level, name, parent or INSTANCE, NO_ATTRIBUTES))
        else:
            nodes.extend(_parse_rows(csv.reader([line]), where, number))
    return nodes


def _parse_rows(rows: Iterable[list[str]], where: str, first: int = 1) -> list[Node]:
    nodes = []
    try:  # row by row: a list of all the rows would double the memory a long list takes
        for number, row in enumerate(rows, first):
            cells = [cell.strip() for cell in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if not 2 <= len(cells) <= 4:
                raise SourceError(f"{where}:{number}: expected level,name,parent[,attributes], got {','.join(row)!r}")
            cells += [""] * (4 - len(cells))
            nodes.append(node_of(cells[0], cells[1], cells[2], cells[3], f"{where}:{number}"))
    except csv.Error as exc:
        raise SourceError(f"{where}: not CSV: {exc}") from None
    return nodes


def parse_objects(items: object, where: str) -> list[Node]:
    """Nodes from a list of ``{"level", "name", "parent", "attributes"}`` objects."""
    if not isinstance(items, list):
        raise SourceError(f"{where}: expected a list of nodes, got {type(items).__name__}")
    nodes = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or "level" not in item or "name" not in item:
            raise SourceError(f"{where}: item {number} is not a node object with a level and a name")
        nodes.append(node_of(item["level"], item["name"], item.get("parent"), item.get("attributes") or {},
                             f"{where}: item {number}"))
    return nodes


# ------------------------------------------------------------------ sources


class FileFetcher:
    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: float | None = None  # mtime of the last good read

    def fetch(self, now: float) -> list[Node] | None:
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime == self.seen:
                return None
            with open(self.path, encoding="utf-8-sig") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceError(f"cannot read {self.path}: {exc}") from None
        if self.path.endswith(".json"):
            try:
                nodes = parse_objects(json.loads(text), self.path)
            except ValueError as exc:
                raise SourceError(f"{self.path}: not JSON: {exc}") from None
        else:
            nodes = parse_csv(text, self.path)
        self.seen = mtime
        return nodes


class ScriptFetcher:
    def __init__(self, command: str, timeout: float = SCRIPT_TIMEOUT) -> None:
        self.command = command
        self.timeout = timeout

    def fetch(self, now: float) -> list[Node]:
        try:
            done = subprocess.run(shlex.split(self.command), capture_output=True, timeout=self.timeout, check=False)
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            raise SourceError(f"cannot run {self.command!r}: {' '.join(str(exc).split())}") from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip().splitlines()
            raise SourceError(f"{self.command!r} exited with {done.returncode}" + (f": {said[-1]}" if said else ""))
        try:
            text = done.stdout.decode()
        except UnicodeDecodeError:
            raise SourceError(f"{self.command!r} printed something that is not UTF-8") from None
        return parse_csv(text, self.command)


def get_v1(url: str, kind: str, timeout: float = HTTP_TIMEOUT) -> dict[str, Any]:
    """GET an object of the work-queue pattern's source interface (``{"kind":
    KIND, "apiVersion": "v1", ...}``); SourceError (one line) for a failed
    request, a body that is not JSON, or another kind or version."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = json.loads(answer.read().decode())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise SourceError(f"GET {url}: {' '.join(str(exc).split())}") from None
    if not isinstance(body, dict) or body.get("kind") != kind or body.get("apiVersion") != "v1":
        found, version = (body.get("kind"), body.get("apiVersion")) if isinstance(body, dict) else (None, None)
        raise SourceError(f"GET {url}: expected kind {kind!r}, apiVersion 'v1'; "
                          f"got kind {found!r}, apiVersion {version!r}")
    return body


class HttpFetcher:
    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout

    def fetch(self, now: float) -> list[Node]:
        body = get_v1(self.url, "ItemList", self.timeout)
        return parse_objects(body.get("items"), f"GET {self.url}")


class PythonFetcher:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        module_name, path, self.args, self.kwargs = parse_spec(spec)
        if os.getcwd() not in sys.path:  # a module in the current folder is found, as a worker's is
            sys.path.insert(0, os.getcwd())
        try:
            target: object = importlib.import_module(module_name)
            for name in path:
                target = getattr(target, name)
        except Exception as exc:
            raise WorkerSpecError(f"python source {spec!r}: {type(exc).__name__}: {exc}") from exc
        if not callable(target) or not getattr(target, MARK, False):
            raise WorkerSpecError(f"python source {spec!r} is not a function marked with @redbike.nodesources.node_source")
        self.function: Callable[..., Iterable[object]] = target

    def fetch(self, now: float) -> list[Node]:
        try:
            items = list(self.function(*self.args, **self.kwargs))
        except Exception as exc:
            raise SourceError(f"{self.spec} raised {type(exc).__name__}: {exc}") from exc
        nodes = []
        for number, item in enumerate(items, 1):
            where = f"{self.spec}: item {number}"
            if isinstance(item, Node):
                nodes.append(node_of(item.level, item.name, item.parent, item.attributes, where))
            elif isinstance(item, dict):
                nodes.extend(parse_objects([item], where))
            elif isinstance(item, tuple) and 3 <= len(item) <= 4:
                nodes.append(node_of(item[0], item[1], item[2], item[3] if len(item) == 4 else {}, where))
            else:
                raise SourceError(f"{where}: not a node: {item!r}")
        return nodes


class TimeFetcher:
    def __init__(self, argument: str) -> None:
        level, period, lifetime = argument.split()
        self.level = level
        try:
            self.period, self.lifetime = float(period), float(lifetime)
        except ValueError:
            self.period = self.lifetime = 0.0
        if not (1 <= self.period <= self.lifetime <= 10 * 365 * 86400):
            raise SourceError(f"time source: PERIOD and LIFETIME must be seconds, 1 <= PERIOD <= LIFETIME, got {argument!r}")

    def fetch(self, now: float) -> list[Node]:
        latest = now - now % self.period
        nodes = []
        start = latest
        while start > now - self.lifetime:
            name = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start))
            nodes.append(Node(self.level, name, INSTANCE, {"start": f"{start:.0f}", "end": f"{start + self.period:.0f}"}))
            start -= self.period
        return nodes[::-1]


def make_fetcher(spec: SourceSpec) -> Fetcher:
    """The fetcher of a configured source (WorkerSpecError or SourceError if it cannot be made)."""
    if spec.kind == "file":
        return FileFetcher(spec.argument)
    if spec.kind == "script":
        return ScriptFetcher(spec.argument)
    if spec.kind == "http":
        return HttpFetcher(spec.argument)
    if spec.kind == "python":
        return PythonFetcher(spec.argument)
    if spec.kind == "time":
        return TimeFetcher(spec.argument)
    raise SourceError(f"unknown source type {spec.kind!r}")


# --------------------------------------------------------------- the loader


@dataclass
class Polled:
    """One source's state: its last good list (None: none yet), when to poll it next, its last error."""

    spec: SourceSpec
    fetcher: Fetcher | None
    good: list[Node] | None = None
    due: float = float("-inf")
    error: str = ""


class NodeLoader:
    """Polls every source on its interval and keeps each one's last good list."""

    def __init__(self, config: NodeConfig, stored: Mapping[str, list[Node]] | None = None) -> None:
        """``stored``: each source's nodes as last reconciled (Redis' P:nodes): the
        last good lists after a restart, which the guard compares against."""
        self.config = config
        self.polled: dict[str, Polled] = {}
        for spec in config.sources:
            try:
                fetcher: Fetcher | None = make_fetcher(spec)
                error = ""
            except (SourceError, WorkerSpecError) as exc:
                fetcher, error = None, str(exc)
                log.error("node source %s: %s", spec.name, exc)
            self.polled[spec.name] = Polled(spec, fetcher, (stored or {}).get(spec.name), error=error)

    def poll(self, now: float, force: bool = False) -> list[str]:
        """Fetch the sources that are due (all with ``force``); the names of
        those whose good list changed."""
        changed = []
        for name, polled in self.polled.items():
            if polled.fetcher is None or (now < polled.due and not force):
                continue
            polled.due = now + polled.spec.every
            try:
                nodes = polled.fetcher.fetch(now)
            except Exception as exc:  # noqa: BLE001 - one failing source never stops the others
                polled.error = str(exc) if isinstance(exc, SourceError) else f"{type(exc).__name__}: {exc}"
                log.error("node source %s failed; keeping its last good list: %s", name, polled.error)
                continue
            if nodes is None:  # unchanged
                continue
            problem = self._checked(polled, nodes)
            if problem:
                polled.error = problem
                log.error("node source %s: %s; keeping its last good list", name, problem)
                continue
            for node in nodes:  # made by this fetch (every fetcher makes its own): labelled, not copied
                node.source = name
            polled.error = ""
            if nodes != polled.good:
                polled.good = nodes
                changed.append(name)
        return changed

    def _checked(self, polled: Polled, nodes: list[Node]) -> str:
        """Why ``nodes`` cannot replace the source's good list ('' if they can)."""
        known = self.config.parent_level
        for node in nodes:
            if node.level not in known:
                return f"node {node.name!r} is on unknown level {node.level!r}"
        names = [node.name for node in nodes]
        if len(set(names)) != len(names):
            return "a node name is given twice"
        before = len(polled.good or ())
        if before and (before - len(nodes)) / before > self.config.guard_fraction:
            return (f"returned {len(nodes)} nodes, {before} before: more than "
                    f"{self.config.guard_fraction:.0%} fewer (guard-fraction)")
        return ""

    def nodes(self) -> list[Node]:
        """Every source's last good nodes."""
        return [node for polled in self.polled.values() for node in polled.good or ()]

    def errors(self) -> dict[str, str]:
        return {name: polled.error for name, polled in self.polled.items() if polled.error}
