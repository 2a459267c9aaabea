"""Node sources (nodesources.py), without Redis: the formats, each kind of
source, the last good list, the guard, one failing source among others."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redbike.nodeconfig import NodeConfig, SourceSpec
from redbike.nodes import INSTANCE, Node
from redbike.nodesources import (
    FileFetcher,
    NodeLoader,
    PythonFetcher,
    ScriptFetcher,
    SourceError,
    TimeFetcher,
    _parse_rows,
    node_source,
    parse_csv,
    parse_objects,
)
from redbike.workerspec import WorkerSpecError

LEVELS = {"host": INSTANCE, "db": "host"}
CSV = "# level,name,parent,attributes\nhost,h1,,rack=r1;row=2\n\ndb,d1,h1\ndb,d2,h1\n"


def names(nodes: list[Node] | None) -> list[str]:
    return [node.name for node in nodes or ()]


def test_csv_rows() -> None:
    nodes = parse_csv(CSV, "x")
    assert nodes == [Node("host", "h1", INSTANCE, {"rack": "r1", "row": "2"}), Node("db", "d1", "h1"),
                     Node("db", "d2", "h1")]


@pytest.mark.parametrize(("text", "error"), [
    ("host\n", "x:1: expected level,name,parent[,attributes]"),
    ("host,h 1,\n", "x:1: bad node name 'h 1'"),
    ("host,h1,,rack\n", "x:1: bad attribute 'rack'"),
    ("db,d1,h/1\n", "x:1: bad parent 'h/1'"),
    ("host,h1,\nhost,a:b,\n", "x:2: bad node name 'a:b'"),
])
def test_csv_garbage(text: str, error: str) -> None:
    with pytest.raises(SourceError, match="^" + error.replace("[", "\\[").replace("]", "\\]")):
        parse_csv(text, "x")


def test_node_objects() -> None:
    items = [{"level": "host", "name": "h1"}, {"level": "db", "name": "d1", "parent": "h1", "attributes": {"shard": 3}}]
    assert parse_objects(items, "x") == [Node("host", "h1"), Node("db", "d1", "h1", {"shard": "3"})]
    with pytest.raises(SourceError, match="item 1 is not a node object"):
        parse_objects(["h1"], "x")
    with pytest.raises(SourceError, match="expected a list of nodes, got dict"):
        parse_objects({"level": "host"}, "x")


def test_a_file_is_read_again_only_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "nodes.csv"
    path.write_text(CSV)
    fetcher = FileFetcher(str(path))
    assert names(fetcher.fetch(0)) == ["h1", "d1", "d2"]
    assert fetcher.fetch(0) is None  # unchanged
    path.write_text("host,h1,\n")
    os.utime(path, (1, 1))  # a new mtime, whatever the file system's granularity
    assert names(fetcher.fetch(0)) == ["h1"]
    json_path = tmp_path / "nodes.json"
    json_path.write_text(json.dumps([{"level": "host", "name": "h9"}]))
    assert names(FileFetcher(str(json_path)).fetch(0)) == ["h9"]
    json_path.write_text("[{")
    with pytest.raises(SourceError, match="not JSON"):
        FileFetcher(str(json_path)).fetch(0)
    with pytest.raises(SourceError, match="cannot read"):
        FileFetcher(str(tmp_path / "missing.csv")).fetch(0)


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fetch-nodes"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_script(tmp_path: Path) -> None:
    command = script(tmp_path, "print('host,h1,'); print('db,d1,h1')\n")
    assert names(ScriptFetcher(command).fetch(0)) == ["h1", "d1"]
    failing = script(tmp_path, "import sys; print('host,h1,'); sys.exit('cannot reach the inventory')\n")
    with pytest.raises(SourceError, match="exited with 1: cannot reach the inventory"):
        ScriptFetcher(failing).fetch(0)
    with pytest.raises(SourceError, match="cannot run"):
        ScriptFetcher(str(tmp_path / "nothing-here")).fetch(0)


@node_source
def plugin_nodes(hosts: int = 2) -> list[object]:
    return [("host", f"h{i}", "") for i in range(hosts)] + [Node("db", "d0", "h0"), {"level": "db", "name": "d1", "parent": "h1"}]


def unmarked() -> list[object]:
    raise AssertionError("an unmarked function must never be called")


def test_a_python_plugin() -> None:
    assert names(PythonFetcher("test_nodesources:plugin_nodes(3)").fetch(0)) == ["h0", "h1", "h2", "d0", "d1"]
    with pytest.raises(WorkerSpecError, match="not a function marked with @redbike.nodesources.node_source"):
        PythonFetcher("test_nodesources:unmarked")
    with pytest.raises(WorkerSpecError, match="not a function marked"):
        PythonFetcher("os:getcwd")
    with pytest.raises(WorkerSpecError, match="ModuleNotFoundError"):
        PythonFetcher("no_such_module_here:f")


def test_a_time_source() -> None:
    fetcher = TimeFetcher("window 900 3600")
    nodes = fetcher.fetch(1_700_000_000.0)  # 2023-11-14T22:13:20Z
    assert names(nodes) == ["20231114T211500Z", "20231114T213000Z", "20231114T214500Z", "20231114T220000Z"]
    assert nodes[-1].attributes == {"start": "1699999200", "end": "1700000100"}
    assert names(fetcher.fetch(1_700_000_100.0))[-1] == "20231114T221500Z"  # a new window; the oldest gone
    assert len(fetcher.fetch(1_700_000_100.0)) == 4
    with pytest.raises(SourceError, match="PERIOD and LIFETIME"):
        TimeFetcher("window 900 60")


def config(tmp_path: Path, *sources: SourceSpec, guard: float = 0.5) -> NodeConfig:
    return NodeConfig(parent_level=dict(LEVELS), sources=list(sources), guard_fraction=guard)


def test_the_last_good_list_the_guard_and_one_failing_source(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("".join(f"host,h{i},\n" for i in range(10)))
    broken = script(tmp_path, "print('not,a,node,list,at,all')\n")
    loader = NodeLoader(config(tmp_path, SourceSpec("fleet", "file", str(fleet)),
                               SourceSpec("broken", "script", broken)))
    assert loader.poll(0.0) == ["fleet"]
    assert names(loader.nodes()) == [f"h{i}" for i in range(10)]
    assert {node.source for node in loader.nodes()} == {"fleet"}
    assert "expected level,name,parent" in loader.errors()["broken"]
    assert loader.poll(1.0) == []  # not due again for 60 s

    def rewrite(count: int, when: float) -> list[str]:
        fleet.write_text("".join(f"host,h{i},\n" for i in range(count)))
        os.utime(fleet, (when, when))
        return loader.poll(when)

    assert rewrite(5, 61.0) == ["fleet"]  # 50% fewer: allowed (more than 50% is not)
    assert len(loader.nodes()) == 5
    assert rewrite(2, 122.0) == []  # 60% fewer: the guard keeps the last good list
    assert len(loader.nodes()) == 5
    assert "returned 2 nodes, 5 before: more than 50% fewer" in loader.errors()["fleet"]
    assert rewrite(4, 183.0) == ["fleet"]
    assert "fleet" not in loader.errors()
    fleet.write_text("host,h1,\nhost,h1,\n")
    os.utime(fleet, (244, 244))
    assert loader.poll(244.0) == [] and "given twice" in loader.errors()["fleet"]
    fleet.write_text("host,h1,\ndisk,x,\n")
    os.utime(fleet, (305, 305))
    assert loader.poll(305.0) == [] and "unknown level 'disk'" in loader.errors()["fleet"]
    assert len(loader.nodes()) == 4


def test_the_guard_counts_from_the_stored_list_after_a_restart(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("host,h1,\n")
    stored = {"fleet": [Node("host", f"h{i}", source="fleet") for i in range(4)]}
    loader = NodeLoader(config(tmp_path, SourceSpec("fleet", "file", str(fleet))), stored)
    assert loader.poll(0.0) == []
    assert len(loader.nodes()) == 4
    assert "returned 1 nodes, 4 before" in loader.errors()["fleet"]
    unguarded = NodeLoader(config(tmp_path, SourceSpec("fleet", "file", str(fleet)), guard=1.0), stored)
    assert unguarded.poll(0.0) == ["fleet"] and len(unguarded.nodes()) == 1


def test_a_source_that_cannot_be_made_is_an_error_not_a_crash(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.csv"
    fleet.write_text("host,h1,\n")
    loader = NodeLoader(config(tmp_path, SourceSpec("plugin", "python", "os:getcwd"),
                               SourceSpec("fleet", "file", str(fleet))))
    assert loader.poll(0.0) == ["fleet"]
    assert "not a function marked" in loader.errors()["plugin"]


def read_by_csv_module(text: str) -> list[Node] | str:
    """What parse_csv gives, the way it read every row before its fast path: the nodes, or the error."""
    try:
        return _parse_rows(csv.reader(io.StringIO(text)), "f")
    except SourceError as exc:
        return str(exc)


def read_fast(text: str) -> list[Node] | str:
    try:
        return parse_csv(text, "f")
    except SourceError as exc:
        return str(exc)


ROW_PARTS = st.sampled_from(["db", "host", "d1", "h-1", "#", ",", " ", "\n", "\r", '"', "=", "k=v", ";", "|", "\x01",
                             "\u2028", "é", "/", "@", ":"])


@given(st.lists(ROW_PARTS, max_size=40).map("".join))
@settings(max_examples=400, deadline=None)
def test_plain_rows_are_read_as_the_csv_module_reads_them(text: str) -> None:
    assert read_fast(text) == read_by_csv_module(text)


def test_plain_rows_are_read_fast_and_the_others_as_before() -> None:
    text = "host,h1,\n#db,x,h1\ndb,d1,h1\n\ndb, d2 ,h1,shard=3\nhost,h2\n"
    assert parse_csv(text, "f") == [Node("host", "h1"), Node("db", "d1", "h1"), Node("db", "d2", "h1", {"shard": "3"}),
                                    Node("host", "h2")]
    assert "f:1: bad node name" in read_fast("db,d\u20281,h1")  # a line separator is no line end in a CSV file
