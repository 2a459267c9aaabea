"""The [redbike-nodes] section (nodeconfig.py) and the node model's shapes
(nodes.py: the forest, task ids, per-node resources, a task's needs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from redbike.cli import main
from redbike.config import ConfigError, load_config
from redbike.nodeconfig import NodeConfigError, digest, load_node_config, needs_of
from redbike.nodes import INSTANCE, Forest, Node, task_id, task_parts

GOOD = """
[redbike]
prefix = p

[redbike-nodes]
levels = host > db, rack
capacity.host = host_concurrency=2
capacity.db = db_lock=1
capacity.instance = scans=100, other=none
override.DB-Host-17 = host_concurrency=0
source.fleet = file nodes.csv
source.fleet.every = 15
source.api = http http://127.0.0.1:8080/items
source.windows = time rack 900 86400
family.scan = db
family.scan.schedule = CRON_TZ=UTC 0 3 * * *
family.scan.queue = batch
family.scan.needs.host = host_concurrency=1
family.scan.needs.db = db_lock=1
family.scan.needs.instance = scans=1
family.scan.needs.worker = cpu_cores=2
family.scan.misfire = skip
family.scan.retries = 2
guard-fraction = 0.25
kill-orphans-after = never
"""


def write(tmp_path: Path, text: str, name: str = "redbike.conf") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(tmp_path: Path, section: str) -> list[str]:
    with pytest.raises(NodeConfigError) as raised:
        load_node_config(write(tmp_path, "[redbike-nodes]\n" + section))
    return [line.split("[redbike-nodes] ", 1)[1] for line in raised.value.problems]


def test_a_full_section(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load_node_config(path)
    assert config is not None
    assert config.parent_level == {"host": INSTANCE, "db": "host", "rack": INSTANCE}
    assert config.levels_up("db") == ["db", "host", INSTANCE]
    assert config.capacities == {"host": {"host_concurrency": 2}, "db": {"db_lock": 1},
                                 "instance": {"scans": 100, "other": None}}
    assert config.overrides == {"DB-Host-17": {"host_concurrency": 0}}  # the node name keeps its case
    assert [(s.name, s.kind, s.argument, s.every) for s in config.sources] == [
        ("fleet", "file", "nodes.csv", 15.0), ("api", "http", "http://127.0.0.1:8080/items", 60.0),
        ("windows", "time", "rack 900 86400", 60.0)]
    scan = config.families["scan"]
    assert (scan.level, scan.schedule, scan.queue, scan.misfire, scan.retries) == (
        "db", "CRON_TZ=UTC 0 3 * * *", "batch", "skip:0", 2)
    assert scan.needs == {"host": {"host_concurrency": 1}, "db": {"db_lock": 1}, "instance": {"scans": 1},
                          "worker": {"cpu_cores": 2}}
    assert config.guard_fraction == 0.25
    assert config.kill_orphans_after is None
    # the rest of the file is read as before: the section does not disturb it
    assert load_config(path).prefix == "p"


def test_the_commented_example_is_valid() -> None:
    config = load_node_config(str(Path(__file__).resolve().parent.parent / "conf" / "nodes.conf"))
    assert config is not None and sorted(config.families) == ["rollup", "scan"]
    assert config.parent_level == {"host": INSTANCE, "db": "host", "window": INSTANCE}


def test_defaults_and_no_section(tmp_path: Path) -> None:
    assert load_node_config(write(tmp_path, "[redbike]\nprefix = p\n")) is None
    config = load_node_config(write(tmp_path, "[redbike-nodes]\nlevels = host\n"))
    assert config is not None
    assert (config.guard_fraction, config.kill_orphans_after, config.families, config.sources) == (0.5, 60.0, {}, [])


def test_a_file_the_section_points_to(tmp_path: Path) -> None:
    write(tmp_path, "[redbike-nodes]\nlevels = host\nkill-orphans-after = 5\n", "nodes.conf")
    config = load_node_config(write(tmp_path, "[redbike-nodes]\nfile = nodes.conf\n"))
    assert config is not None and config.parent_level == {"host": INSTANCE} and config.kill_orphans_after == 5
    write(tmp_path, "[other]\n", "empty.conf")
    with pytest.raises(ConfigError, match="has no \\[redbike-nodes\\] section"):
        load_node_config(write(tmp_path, "[redbike-nodes]\nfile = empty.conf\n"))


@pytest.mark.parametrize(("section", "expected"), [
    ("levels = host > db\ncapacity.dbs = x=1\n", "capacity.dbs: unknown level 'dbs'"),
    ("levels = host > > db\n", "levels: missing level name in 'host > > db' (a parent level missing?)"),
    ("levels = a > b, b > a\n", "levels: level 'b' has two parent levels: 'a' and 'instance'"),
    ("levels = x > a > b > a\n", "levels: levels form a cycle: a > b > a"),
    ("levels = host > worker\n", "levels: level 'worker' is implicit"),
    ("levels = host\ncapacity.host = host_concurrency=-1\n", "capacity.host: bad capacity -1: must be >= 0"),
    ("levels = host\ncapacity.host = host_concurrency=lots\n", "capacity.host: bad capacity 'lots': not a whole number"),
    ("levels = host\ncapacity.host = host_concurrency\n", "capacity.host: bad capacity in 'host_concurrency'"),
    ("levels = host\ncapacity.host = a@b=1\n", "capacity.host: bad resource name 'a@b'"),
    ("levels = host\nfamily.scan = db\nfamily.scan.schedule = NOW\nfamily.scan.queue = q\n",
     "family.scan: family 'scan' runs on unknown level 'db' (levels: host)"),
    (("levels = host > db\nfamily.scan = host\nfamily.scan.schedule = NOW\nfamily.scan.queue = q\n"
     "family.scan.needs.db = db_lock=1\n"), "family 'scan' needs resources on level 'db', which is not on its path"),
    ("levels = host\nfamily.scan = host\nfamily.scan.schedule = soon\nfamily.scan.queue = q\n",
     "family.scan: family 'scan': bad schedule"),
    ("levels = host\nfamily.scan = host\nfamily.scan.schedule = NOW\nfamily.scan.queue = a:b\n",
     "family.scan: family 'scan': bad queue name 'a:b'"),
    ("levels = host\nfamily.scan = host\nfamily.scan.schedule = NOW\nfamily.scan.queue = q\nfamily.scan.misfire = most\n",
     "family.scan: family 'scan': "),
    ("levels = host\nsource.s = ftp x\n", "source.s: unknown source type 'ftp' (known: file, script, http, python, time)"),
    ("levels = host\nsource.s = http ftp://x\n", "source.s: an http source needs an http:// or https:// URL"),
    ("levels = host\nsource.s = python os.system('x')\n", "source.s: invalid python source spec"),
    ("levels = host\nsource.s = time day 86400\n", "source.s: a time source takes LEVEL PERIOD LIFETIME"),
    ("levels = host\nsource.s = time day 86400 864000\n", "source.s: a time source's level 'day' is not a top level"),
    ("levels = host > db\nsource.s = time db 900 3600\n", "source.s: a time source's level 'db' is not a top level"),
    ("levels = host\nsource.s = file x\nsource.s.every = 0\n", "source.s.every: source.s.every must be a number of seconds above 0"),
    ("levels = host\nguard-fraction = 2\n", "guard-fraction: must be a fraction above 0 and at most 1"),
    ("levels = host\nkill-orphans-after = soon\n", "kill-orphans-after: kill-orphans-after must be a number of seconds from 0"),
    ("levels = host\ncolour = blue\n", "colour: unknown key"),
    ("levels = host\noverride.a/b = x=1\n", "override.a/b: bad node name 'a/b'"),
    ("levels = host\nsource.a|b = file x\n", "source.a|b: bad source name 'a|b'"),
])
def test_one_clear_line_per_mistake(tmp_path: Path, section: str, expected: str) -> None:
    found = problems(tmp_path, section)
    assert len(found) == 1, found
    assert expected in found[0]
    assert "\n" not in found[0]


def test_every_mistake_is_reported_with_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[redbike-nodes]\nlevels = host\ncapacity.hots = x=1\nsource.s = ftp x\n")
    with pytest.raises(NodeConfigError) as raised:
        load_node_config(path)
    assert raised.value.problems == [
        f"{path}: [redbike-nodes] capacity.hots: unknown level 'hots' (levels: host, instance)",
        f"{path}: [redbike-nodes] source.s: unknown source type 'ftp' (known: file, script, http, python, time)",
    ]


def test_cli_bad_section_is_exit_2_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[redbike-nodes]\nlevels = host\ncapacity.hots = x=1\n")
    assert main(["--config", path, "nodes", "--reconcile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("redbike: ") and "unknown level 'hots'" in err and "Traceback" not in err
    assert main(["--config", write(tmp_path, "[redbike]\n", "bare.conf"), "nodes", "--reconcile"]) == 2
    assert "no [redbike-nodes] section" in capsys.readouterr().err


# ------------------------------------------------------------ the node model


def test_forest_paths_and_what_it_leaves_out() -> None:
    parents = {"host": INSTANCE, "db": "host"}
    forest = Forest([
        Node("host", "h1"), Node("db", "d1", "h1"), Node("db", "d2", "h2"),  # h2 is no node
        Node("db", "d3", "d1"),  # its parent is a db, not a host
        Node("host", "h1"),  # given twice
        Node("disk", "x"),  # unknown level
        Node("db", "d4"),  # a db needs a parent
    ], parents)
    assert sorted(forest.nodes) == ["d1", "h1"]
    assert [n.name for n in forest.path(forest.nodes["d1"])] == ["h1", "d1"]
    assert len(forest.dropped) == 5
    assert any("d3: its parent 'd1' is a db, not a host" in why for why in forest.dropped)


def test_task_ids_and_needs_along_the_path(tmp_path: Path) -> None:
    config = load_node_config(write(tmp_path, GOOD))
    assert config is not None
    scan = config.families["scan"]
    path = [Node("host", "db-host-17"), Node("db", "db3", "db-host-17")]
    taskid = task_id("scan", [n.name for n in path], scan.queue)
    assert taskid == "scan/db-host-17/db3:batch"
    assert task_parts(taskid) == ("scan", ["db-host-17", "db3"], "batch")
    needs = needs_of(scan, path)
    assert needs == {"scans@instance": 1, "host_concurrency@db-host-17": 1, "db_lock@db3": 1, "worker:cpu_cores": 2}
    moved = needs_of(scan, [Node("host", "db-host-18"), Node("db", "db3", "db-host-18")])
    assert digest(scan, needs) != digest(scan, moved)
    assert digest(scan, needs) == digest(scan, dict(needs))


def test_node_records_round_trip() -> None:
    node = Node("db", "db3", "db-host-17", {"shard": "7", "replica_of": "db9"}, "fleet")
    assert Node.decode("db3", node.encode()) == node
