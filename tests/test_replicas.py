"""Replicas in the node model (issue #9): a node with alternative parents
(``replica_of``) gives its tasks one path to the root per parent; a claim
takes the first path with room, and a task that finds none waits in line on
each path, woken by a release on any of them. Parsing and validation first,
then claims on the real server (and fakeredis: the ``c`` fixture)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from test_jobs import Env

from redbike.claims import Rotation
from redbike.nodeconfig import load_node_config, needs_on_paths
from redbike.nodes import Forest, Node
from redbike.nodesources import parse_csv, parse_objects
from redbike.parking import parked_lines
from redbike.reconcile import Reconciler
from redbike.records import ALTERNATIVES_SEP, decode_alternatives, decode_lease, encode_alternatives
from redbike.slots import Running
from redbike.states import Outcome

LEVELS = {"host": "instance", "db": "host"}
SECTION = """
[redbike-nodes]
levels = host > db
capacity.host = hc=1
capacity.db = dl=2
source.fleet = file nodes.csv
family.scan = db
family.scan.schedule = CONTINUE
family.scan.queue = A
family.scan.needs.host = hc=1
family.scan.needs.db = dl=1
"""


# ============================================================ parsing, validation


def test_replica_of_in_csv_and_json() -> None:
    csv_nodes = parse_csv("host,h1,\nhost,h2,\nhost,h3,\ndb,d1,h1,replica_of=h2;h3\n", "nodes.csv")
    assert csv_nodes[-1].replica_of == ["h2", "h3"]
    for value in ("h2 h3", ["h2", "h3"]):
        item = {"level": "db", "name": "d1", "parent": "h1", "attributes": {"replica_of": value}}
        assert parse_objects(json.loads(json.dumps([item])), "nodes.json")[0].replica_of == ["h2", "h3"]
    assert Node("db", "d1", "h1").replica_of == []


def test_bad_alternative_parents_are_left_out_the_node_kept() -> None:
    nodes = [Node("host", "h1"), Node("host", "h2"),
             Node("db", "d1", "h1", {"replica_of": "h2;nope;d2;h1;h2"}), Node("db", "d2", "h1"),
             Node("host", "h9", attributes={"replica_of": "h1"})]
    forest = Forest(nodes, LEVELS)
    assert set(forest.nodes) == {"h1", "h2", "d1", "d2", "h9"}
    assert forest.alternates == {"d1": ["h2"]}
    assert forest.dropped == [
        "db d1: its alternative parent 'nope' is not a node; left out",
        "db d1: its alternative parent 'd2' is a db, not a host; left out",
        "db d1: its alternative parent 'h1' is its parent already; left out",
        "host h9: its alternative parent 'h1' cannot be: level host is a top level; left out",
    ]


def test_paths_go_through_each_parent_primary_first() -> None:
    levels = {"rack": "instance", "host": "rack", "db": "host"}
    nodes = [Node("rack", "r1"), Node("rack", "r2"),
             Node("host", "h1", "r1", {"replica_of": "r2"}), Node("host", "h2", "r2"),
             Node("db", "d1", "h1", {"replica_of": "h2"}), Node("db", "d0", "h2")]
    forest = Forest(nodes, levels)
    names = [[n.name for n in path] for path in forest.paths(forest.nodes["d1"])]
    assert names == [["r1", "h1", "d1"], ["r2", "h1", "d1"], ["r2", "h2", "d1"]]
    assert [[n.name for n in p] for p in forest.paths(forest.nodes["d0"])] == [["r2", "h2", "d0"]]
    assert forest.replicas_of({"r2"}) == {"h1"} and forest.replicas_of({"h2"}) == {"d1"}


def test_needs_per_path_and_their_codec(tmp_path: Path) -> None:
    (tmp_path / "nodes.conf").write_text(SECTION)
    config = load_node_config(str(tmp_path / "nodes.conf"))
    assert config is not None
    forest = Forest([Node("host", "h1"), Node("host", "h2"), Node("db", "d1", "h1", {"replica_of": "h2"})], LEVELS)
    needs = needs_on_paths(config.families["scan"], forest.paths(forest.nodes["d1"]))
    assert needs == [{"dl@d1": 1, "hc@h1": 1}, {"dl@d1": 1, "hc@h2": 1}]
    assert isinstance(needs, list)
    text = encode_alternatives(needs)
    assert text == "dl@d1=1,hc@h1=1" + ALTERNATIVES_SEP + "dl@d1=1,hc@h2=1"
    assert decode_alternatives(text) == needs
    assert encode_alternatives([{"a": 1}, {"a": 1}]) == "a=1"  # one path: plain needs
    assert encode_alternatives([{"a": 1}, {}]) == ""  # a path that needs nothing always has room
    assert decode_alternatives("") == [{}]


# ============================================================ claims


@pytest.fixture
def env(c: redis.Redis, prefix: str, tmp_path: Path) -> Env:
    return Env(c, prefix, queues="A")


class Fleet:
    """Hosts h1 and h2 (hc=1 each), d1 on h1 with replica_of h2, and the
    ``fillers``: dbs f1 on h1 and f2 on h2, each able to hold its host."""

    def __init__(self, env: Env, tmp_path: Path, fillers: tuple[str, ...] = ("f1", "f2")) -> None:
        (tmp_path / "nodes.conf").write_text(SECTION)
        config = load_node_config(str(tmp_path / "nodes.conf"))
        assert config is not None
        self.env = env
        self.fillers = fillers
        self.reconciler = Reconciler(env.bike, config)
        self.pool = env.pool("A")
        self.rotation = Rotation(self.pool.queue_names)

    def nodes(self, replica_of: str = "h2") -> list[Node]:
        return [Node("host", "h1", source="fleet"), Node("host", "h2", source="fleet"),
                Node("db", "d1", "h1", {"replica_of": replica_of} if replica_of else {}, source="fleet"),
                *(Node("db", f, "h" + f[1], source="fleet") for f in self.fillers)]

    def start(self, **kwargs: str) -> dict[str, Running]:
        """Reconcile, then let the fillers claim their hosts before d1 comes."""
        assert self.reconciler.reconcile(self.nodes(**kwargs)).errors == []
        self.env.bike.set(D1, "STOP")
        runs = self.claim_all()
        assert set(runs) == {FILLERS[f] for f in self.fillers}
        self.env.bike.set(D1, "CONTINUE")
        return runs

    def claim(self) -> Running | None:
        return self.pool.claim(self.rotation, "w1")

    def claim_all(self) -> dict[str, Running]:
        runs = {}
        while (run := self.claim()) is not None:
            runs[run.lease.jobid] = run
        return runs

    def finish(self, run: Running, then_claim: bool = False) -> Running | None:
        return self.pool.finish(run, Outcome("ok"), "", self.rotation if then_claim else None, "w1")[1]

    def stop_all(self, runs: list[Running]) -> None:
        """Every task stops after its run; every run ends."""
        for taskid in (D1, *FILLERS.values()):
            self.env.bike.set(taskid, "STOP")
        for run in runs:
            self.finish(run)

    def usage(self) -> dict[str, int]:
        return {r: int(v) for r, v in self.env.c.hgetall(self.env.keys.usage).items()}

    def holds(self, jobid: str) -> str:
        return decode_lease(self.env.c.hget(self.env.keys.leases, jobid)).needs


D1 = "scan/h1/d1:A"
FILLERS = {"f1": "scan/h1/f1:A", "f2": "scan/h2/f2:A"}


def test_host_a_full_runs_on_host_b(env: Env, tmp_path: Path) -> None:
    fleet = Fleet(env, tmp_path, fillers=("f1",))
    runs = fleet.start()
    assert env.bike.tell(D1)["needs"] == "dl@d1=1,hc@h1=1 dl@d1=1,hc@h2=1"
    run = fleet.claim()
    assert run is not None and run.lease.jobid == D1
    assert fleet.holds(D1) == "dl@d1=1,hc@h2=1"  # the path through h2: h1 is full
    assert fleet.usage() == {"hc@h1": 1, "dl@f1": 1, "hc@h2": 1, "dl@d1": 1}
    told = env.bike.tell(D1)
    assert told["lease"]["holds"] == "dl@d1=1,hc@h2=1"
    path = [{"level": "instance", "name": "instance"}, {"level": "host", "name": "h1"}, {"level": "db", "name": "d1"}]
    other = [path[0], {"level": "host", "name": "h2"}, path[2]]
    assert told["task"]["path"] == path and told["task"]["paths"] == [path, other]
    assert told["task"]["path_taken"] == other
    assert env.bike.explain(D1).lines()[-2] == ("task of scan on node d1, path instance > h1 (host) > d1 (db) "
                                                "(or instance > h2 (host) > d1 (db)); "
                                                "runs on path instance > h2 (host) > d1 (db)")
    node = env.bike.node("d1")
    assert node["alternative_parents"] == ["h2"] and node["parent"] == "h1"
    assert env.bike.node("f1")["alternative_parents"] == []
    fleet.stop_all([run, *runs.values()])
    assert fleet.usage() == {}


def test_the_primary_path_first(env: Env, tmp_path: Path) -> None:
    fleet = Fleet(env, tmp_path, fillers=())
    fleet.start()
    run = fleet.claim()
    assert run is not None and fleet.holds(D1) == "dl@d1=1,hc@h1=1"
    fleet.stop_all([run])
    assert fleet.usage() == {}


@pytest.mark.parametrize("ending", ["f1", "f2"])
def test_both_paths_full_parks_and_a_finish_on_either_wakes(env: Env, tmp_path: Path, ending: str) -> None:
    fleet = Fleet(env, tmp_path)
    runs = fleet.start()
    assert fleet.claim_all() == {}
    lines = parked_lines(env.c.hget(env.keys.parking, D1))
    assert [p.resource for p in lines] == ["hc@h1", "hc@h2"]
    assert len({p.seq for p in lines}) == 1
    assert env.bike.tell(D1)["waiting_for"] == "hc@h1 or hc@h2"
    assert "path_taken" not in env.bike.tell(D1)["task"]
    assert env.bike.explain(D1).lines()[-1] == (
        "no path has room (2 paths; a release on any wakes it): "
        "path 1 (via h1): waiting for hc@h1 (1st of 1 in line), which is full: 1/1 held by scan/h1/f1:A; "
        "path 2 (via h2): waiting for hc@h2 (1st of 1 in line), which is full: 1/1 held by scan/h2/f2:A")
    # a finish on either host wakes d1 (in the same script), which takes that host's path
    woken = fleet.finish(runs.pop(FILLERS[ending]), then_claim=True)
    host = "hc@h" + ending[1]
    assert woken is not None and woken.lease.jobid == D1
    assert fleet.holds(D1) == f"dl@d1=1,{host}=1"
    assert env.c.zcard(env.keys.parked) == 0 and env.c.hget(env.keys.parking, D1) is None
    assert {r: v for r, v in fleet.usage().items() if r.startswith("hc@")} == {"hc@h1": 1, "hc@h2": 1}
    fleet.stop_all([woken, *runs.values()])
    assert fleet.usage() == {}


def test_unset_takes_a_task_out_of_every_line(env: Env, tmp_path: Path) -> None:
    fleet = Fleet(env, tmp_path)
    runs = fleet.start()
    assert fleet.claim_all() == {}
    assert len(env.c.zrange(env.keys.parked, 0, -1)) == 2
    env.bike.unset(D1)
    assert env.c.zrange(env.keys.parked, 0, -1) == [] and env.c.hget(env.keys.parking, D1) is None
    fleet.stop_all(list(runs.values()))
    assert fleet.usage() == {}


def test_a_pass_of_the_changes_follows_an_alternative_parent(env: Env, tmp_path: Path) -> None:
    fleet = Fleet(env, tmp_path, fillers=())
    fleet.start()
    h1 = Node("host", "h1", source="fleet")
    d1 = Node("db", "d1", "h1", {"replica_of": "h2"}, source="fleet")
    done = fleet.reconciler.reconcile([h1, d1])  # h2 vanished: d1 keeps one path
    assert not done.whole and done.changed == [D1]
    assert done.dropped == ["db d1: its alternative parent 'h2' is not a node; left out"]
    assert env.bike.tell(D1)["needs"] == "dl@d1=1,hc@h1=1"
    done = fleet.reconciler.reconcile([h1, Node("host", "h2", source="fleet"), d1])  # back: two paths again
    assert not done.whole and done.changed == [D1]
    assert env.bike.tell(D1)["needs"] == "dl@d1=1,hc@h1=1 dl@d1=1,hc@h2=1"


def test_a_capacity_raised_on_one_path_wakes_the_task_out_of_both_lines(env: Env, tmp_path: Path) -> None:
    fleet = Fleet(env, tmp_path)
    runs = fleet.start()
    assert fleet.claim_all() == {}
    env.bike.set_capacities([("hc@h1", None)])  # h1 unlimited: the task is woken and takes h1
    run = fleet.claim()
    assert run is not None and run.lease.jobid == D1 and fleet.holds(D1) == "dl@d1=1,hc@h1=1"
    assert env.c.zrange(env.keys.parked, 0, -1) == []
    fleet.stop_all([run, *runs.values()])
    assert fleet.usage() == {}


def test_set_by_hand_with_alternatives(env: Env) -> None:
    env.bike.set_capacities([("a", 0), ("b", 1)])
    env.bike.set("j:A", "NOW", needs=[{"a": 1}, {"b": 1}])
    run = env.claim()
    assert run is not None and decode_lease(env.c.hget(env.keys.leases, "j:A")).needs == "b=1"
    with pytest.raises(ValueError, match="alternative paths"):
        env.bike.set("k:A", "NOW", needs=[])
