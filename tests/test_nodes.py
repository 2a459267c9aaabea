"""The node model on a Redis server (issue #9): reconciliation's diff and
apply (fakeredis and the real server), then real sources and processes on
the real server: a script source a test rewrites, an HTTP /items source (and
one of the wrong kind), the guard, and a real worker pool holding two tasks
of one host apart under the host's capacity of 1."""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from conftest import ROOT, Daemons, RedisServer, free_port, wait_for, write_config
from test_jobs import NOW, Env

from redbike import Redbike
from redbike.cli import main
from redbike.nodeconfig import NodeConfig, load_node_config
from redbike.nodeloop import reconcile_loop, reconcile_once
from redbike.nodes import Node
from redbike.reconcile import Busy, Reconciler
from redbike.resources import ResourceError
from redbike.states import Outcome

NODES_SECTION = """
[redbike-nodes]
levels = host > db
capacity.host = host_concurrency={host_capacity}
capacity.db = db_lock=1
source.fleet = {source}
family.scan = db
family.scan.schedule = {schedule}
family.scan.queue = {queue}
family.scan.needs.host = host_concurrency=1
family.scan.needs.db = db_lock=1
family.report = host
family.report.schedule = CRON_TZ=UTC 0 4 * * *
family.report.queue = {queue}
kill-orphans-after = 30
"""


def section(source: str = "file nodes.csv", schedule: str = "CRON_TZ=UTC 0 3 * * *", queue: str = "A",
            host_capacity: int = 2) -> str:
    return NODES_SECTION.format(source=source, schedule=schedule, queue=queue, host_capacity=host_capacity)


def node_config(tmp_path: Path, **kwargs: Any) -> NodeConfig:
    path = tmp_path / "nodes.conf"
    path.write_text(section(**kwargs))
    config = load_node_config(str(path))
    assert config is not None
    return config


def fleet(hosts: dict[str, list[str]]) -> list[Node]:
    nodes = []
    for host, dbs in hosts.items():
        nodes.append(Node("host", host, source="fleet"))
        nodes.extend(Node("db", db, host, source="fleet") for db in dbs)
    return nodes


def tasks(env: Env) -> dict[str, str]:
    return env.c.hgetall(env.keys.tasks)


# ================================================== 1. the diff and its apply


@pytest.fixture
def env(c: redis.Redis, prefix: str) -> Env:
    return Env(c, prefix)


def test_tasks_follow_the_nodes(env: Env, tmp_path: Path) -> None:
    reconciler = Reconciler(env.bike, node_config(tmp_path))
    done = reconciler.reconcile(fleet({"h1": ["d1", "d2"], "h2": ["d3"]}))
    assert sorted(done.added) == ["report/h1:A", "report/h2:A", "scan/h1/d1:A", "scan/h1/d2:A", "scan/h2/d3:A"]
    assert sorted(tasks(env)) == sorted(done.added)
    told = env.bike.tell("scan/h1/d2:A")
    assert told["status"].startswith("TML:") and told["next_run"] == 1_700_017_200.0  # 03:00Z the next day
    assert told["needs"] == "db_lock@d2=1,host_concurrency@h1=1"
    assert {r: (cap, used) for r, cap, used, _ in env.bike.capacities()} == {
        "host_concurrency@h1": (2, 0), "host_concurrency@h2": (2, 0),
        "db_lock@d1": (1, 0), "db_lock@d2": (1, 0), "db_lock@d3": (1, 0)}
    assert list(env.bike.nodes()) == [("db", "d1", "h1", 1, 0), ("db", "d2", "h1", 1, 0), ("db", "d3", "h2", 1, 0),
                                      ("host", "h1", "", 1, 0), ("host", "h2", "", 1, 0)]
    assert list(env.bike.nodes(level="host")) == [("host", "h1", "", 1, 0), ("host", "h2", "", 1, 0)]

    # the same nodes again: nothing to do
    assert reconciler.reconcile(fleet({"h1": ["d1", "d2"], "h2": ["d3"]})).summary() == "nothing changed"

    # d2 moves to h2, d1 goes, d4 comes: tasks follow, each one once
    done = reconciler.reconcile(fleet({"h1": [], "h2": ["d3", "d2", "d4"]}))
    assert sorted(done.added) == ["scan/h2/d2:A", "scan/h2/d4:A"]
    assert sorted(done.removed) == ["scan/h1/d1:A", "scan/h1/d2:A"]
    assert done.nodes_removed == ["d1"]
    assert sorted(tasks(env)) == ["report/h1:A", "report/h2:A", "scan/h2/d2:A", "scan/h2/d3:A", "scan/h2/d4:A"]
    assert env.bike.tell("scan/h1/d1:A") is None and env.schedule("scan/h1/d2:A") is None
    assert env.bike.tell("scan/h2/d2:A")["needs"] == "db_lock@d2=1,host_concurrency@h2=1"
    assert env.bike.tell("scan/h2/d2:A")["task"] == {"family": "scan", "node": "d2", "path": [
        {"level": "instance", "name": "instance"}, {"level": "host", "name": "h2"}, {"level": "db", "name": "d2"}]}
    env.bike.set("by-hand:A", "NOW")
    assert "task" not in env.bike.tell("by-hand:A")
    explained = env.bike.explain("scan/h2/d2:A")  # explain names the node and its path, before the sentence
    assert explained.lines()[-2] == "task of scan on node d2, path instance > h2 (host) > d2 (db)"
    assert explained.as_json()["task"] == env.bike.tell("scan/h2/d2:A")["task"]
    assert explained.lines()[-1].startswith("next occurrence at ")
    assert env.bike.explain("by-hand:A").as_json()["task"] is None
    assert not any(line.startswith("task of") for line in env.bike.explain("by-hand:A").lines())
    capacities = {r: cap for r, cap, _, _ in env.bike.capacities()}
    assert "db_lock@d1" not in capacities and capacities["db_lock@d4"] == 1

    # a node left out (its parent is unknown) is said so, and has no task
    done = reconciler.reconcile([*fleet({"h1": [], "h2": ["d3", "d2", "d4"]}), Node("db", "d9", "h9", source="fleet")])
    assert done.dropped == ["db d9: its parent 'h9' is not a node"] and "scan/h9/d9:A" not in tasks(env)


def test_a_pass_after_a_clean_one_looks_at_the_changed_nodes_only(env: Env, tmp_path: Path) -> None:
    reconciler = Reconciler(env.bike, node_config(tmp_path))
    nodes = fleet({"h1": ["d1"], "h2": ["d2"]})
    assert reconciler.reconcile(nodes).whole  # no pass before it
    env.c.hdel(env.keys.tasks, "report/h1:A")  # drift that a pass of the changed nodes cannot see
    env.bike.set_capacity("db_lock@d1", 5)
    done = reconciler.reconcile(nodes)
    assert not done.whole and done.summary() == "nothing changed"
    done = reconciler.reconcile(fleet({"h1": ["d1", "d2"]}))  # d2 moves, h2 goes
    assert not done.whole and done.added == ["scan/h1/d2:A"]
    assert sorted(done.removed) == ["report/h2:A", "scan/h2/d2:A"]
    done = reconciler.reconcile(fleet({"h1": ["d1", "d2"]}), whole=True)  # sees all as configured again
    assert done.whole and done.capacities == ["db_lock@d1"] and done.added == ["report/h1:A"]
    env.c.delete(env.keys.reconciled)  # as a pass cut short leaves it
    assert reconciler.reconcile(fleet({"h1": ["d1", "d2"]})).whole
    config = node_config(tmp_path, host_capacity=3)  # another config: a whole pass
    reconciler.config = config
    done = reconciler.reconcile(fleet({"h1": ["d1", "d2"]}))
    assert done.whole and done.capacities == ["host_concurrency@h1"]


def test_a_node_moved_moves_the_tasks_under_it(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "nodes.conf"
    path.write_text("[redbike-nodes]\nlevels = rack > host > db\nsource.fleet = file nodes.csv\n"
                    "family.scan = db\nfamily.scan.schedule = NOW\nfamily.scan.queue = A\n")
    config = load_node_config(str(path))
    assert config is not None
    reconciler = Reconciler(env.bike, config)
    racks = [Node("rack", "r1", source="fleet"), Node("rack", "r2", source="fleet")]
    reconciler.reconcile([*racks, Node("host", "h1", "r1"), Node("db", "d1", "h1"), Node("db", "d2", "h1")])
    assert sorted(tasks(env)) == ["scan/r1/h1/d1:A", "scan/r1/h1/d2:A"]
    done = reconciler.reconcile([*racks, Node("host", "h1", "r2"), Node("db", "d1", "h1"), Node("db", "d2", "h1")])
    assert not done.whole
    assert sorted(done.added) == ["scan/r2/h1/d1:A", "scan/r2/h1/d2:A"]
    assert sorted(done.removed) == ["scan/r1/h1/d1:A", "scan/r1/h1/d2:A"]
    assert sorted(tasks(env)) == ["scan/r2/h1/d1:A", "scan/r2/h1/d2:A"]


def test_a_changed_family_or_override_sets_again(env: Env, tmp_path: Path) -> None:
    first = Reconciler(env.bike, node_config(tmp_path))
    first.reconcile(fleet({"h1": ["d1"]}))
    first.release()  # else the next reconciler finds the lease taken
    config = node_config(tmp_path, schedule="NOW", host_capacity=1)
    config.overrides["h1"] = {"host_concurrency": 0}  # paused; the level's 1 elsewhere
    reconciler = Reconciler(env.bike, config)
    done = reconciler.reconcile(fleet({"h1": ["d1"], "h2": []}))
    assert done.changed == ["scan/h1/d1:A"] and done.added == ["report/h2:A"]
    assert env.status("scan/h1/d1:A").startswith("ENQ:")  # NOW: queued at once
    capacities = {r: cap for r, cap, _, _ in env.bike.capacities()}
    assert capacities["host_concurrency@h1"] == 0 and capacities["host_concurrency@h2"] == 1
    # a family removed from the config takes its tasks with it
    del config.families["report"]
    done = reconciler.reconcile(fleet({"h1": ["d1"], "h2": []}))
    assert sorted(done.removed) == ["report/h1:A", "report/h2:A"]


def test_a_running_task_of_a_vanished_node_is_an_orphan_until_the_grace_ends(env: Env, tmp_path: Path) -> None:
    config = node_config(tmp_path, schedule="NOW")
    reconciler = Reconciler(env.bike, config)
    reconciler.reconcile(fleet({"h1": ["d1", "d2"]}), now=NOW)
    pool = env.pool("A")
    running = env.claim(pool)
    assert running is not None
    taskid = running.lease.jobid
    listed = list(env.bike.nodes())  # tasks and running ones counted on each task's own node
    assert (sum(row[3] for row in listed), sum(row[4] for row in listed)) == (3, 1)

    done = reconciler.reconcile([], now=NOW)  # the host and its dbs are gone
    assert done.orphaned == [taskid]
    assert sorted(done.removed) == sorted({"scan/h1/d1:A", "scan/h1/d2:A", "report/h1:A"} - {taskid})
    assert env.c.hgetall(env.keys.orphans) == {taskid: f"{NOW:.3f}"}
    assert env.bike.nodes() is not None and list(env.bike.nodes()) == []
    assert env.bike.tell(taskid)["task"]["orphaned_since"] == NOW
    explained = env.bike.explain(taskid)
    assert explained.lines()[-2] == (f"task of scan on node {taskid.split('/')[2][:-2]}, a node no longer known; "
                                     "orphaned 2023-11-14 22:13:20Z (now): its node vanished while it ran")
    assert explained.as_json()["task"]["orphaned_since"] == NOW
    # unset at once: its run completes, and it does not start again (its node is gone)
    assert env.schedule(taskid) is None and env.bike.tell(taskid)["unset"] == "running; removed when this run ends"
    assert reconciler.reconcile([], now=NOW + 29).summary() == "nothing changed"  # within the grace
    assert taskid in tasks(env) and env.c.hexists(env.keys.orphans, taskid)

    assert env.c.hget(env.keys.usage, "db_lock@" + taskid.split("/")[2][:-2]) == "1"
    done = reconciler.reconcile([], now=NOW + 30)
    assert done.removed == [taskid]
    assert tasks(env) == {} and env.c.hgetall(env.keys.orphans) == {}
    # its run is ended: the lease gone (its worker's heartbeat kills the run), what it held released
    assert env.leases() == {} and env.deadlines() == {}
    assert set(env.c.hvals(env.keys.usage)) <= {"0"}
    trail = [line.split("|") for line in env.c.hget(env.keys.jobs, taskid).split("\n")[1:]]
    assert trail[-1][1] == "run" and "killed: its node vanished 30 s ago" in trail[-1][-1]
    assert pool.finish(running, Outcome("ok"), "", None, "w1")[0] == "STALE"  # the worker's late finish


def test_an_orphan_whose_node_comes_back_is_kept(env: Env, tmp_path: Path) -> None:
    reconciler = Reconciler(env.bike, node_config(tmp_path, schedule="NOW"))
    nodes = fleet({"h1": ["d1"]})
    reconciler.reconcile(nodes, now=NOW)
    taskid = env.claim(env.pool("A")).lease.jobid
    assert reconciler.reconcile([], now=NOW).orphaned == [taskid]
    done = reconciler.reconcile(nodes, now=NOW + 60)  # back before its grace was looked at again
    assert done.adopted == [taskid] and done.removed == [] and done.changed == []
    assert env.c.hlen(env.keys.orphans) == 0 and sorted(tasks(env)) == ["report/h1:A", "scan/h1/d1:A"]
    assert env.schedule(taskid) == "NOW"  # set again


def test_an_orphan_does_not_start_again(env: Env, tmp_path: Path) -> None:
    reconciler = Reconciler(env.bike, node_config(tmp_path, schedule="CONTINUE"))
    reconciler.reconcile(fleet({"h1": ["d1"]}), now=NOW)
    pool = env.pool("A")
    running = env.claim(pool)
    assert running.lease.jobid == "scan/h1/d1:A"
    assert reconciler.reconcile([], now=NOW).orphaned == ["scan/h1/d1:A"]
    pool.finish(running, Outcome("ok"), "", None, "w1")  # within its grace: CONTINUE would queue it again
    assert env.claim(pool) is None and env.schedule("scan/h1/d1:A") is None
    assert reconciler.reconcile([], now=NOW + 1).removed == ["scan/h1/d1:A"]  # its run is over: forgotten


def test_a_task_that_could_not_be_set_is_tried_again(env: Env, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reconciler = Reconciler(env.bike, node_config(tmp_path))
    original = Redbike._needs_arg

    def refusing(bike: Redbike, jobid: str, *args: Any, **kwargs: Any) -> str:
        if jobid == "scan/h1/d1:A":
            raise ResourceError("refused by the test")
        return original(bike, jobid, *args, **kwargs)

    monkeypatch.setattr(Redbike, "_needs_arg", refusing)
    done = reconciler.reconcile(fleet({"h1": ["d1", "d2"]}))
    assert done.errors == ["scan/h1/d1:A: refused by the test"]
    assert sorted(done.added) == ["report/h1:A", "scan/h1/d2:A"]
    assert sorted(tasks(env)) == ["report/h1:A", "scan/h1/d2:A"]  # not recorded as set
    assert env.c.hget(env.keys.schedules, "scan/h1/d1:A") is None  # nor sent
    monkeypatch.setattr(Redbike, "_needs_arg", original)
    done = reconciler.reconcile(fleet({"h1": ["d1", "d2"]}))
    assert done.whole and done.added == ["scan/h1/d1:A"]  # a pass after one with errors looks at every node


def test_one_reconciler_at_a_time(env: Env, tmp_path: Path) -> None:
    config = node_config(tmp_path)
    holder = Reconciler(env.bike, config)
    assert holder.acquire()
    with pytest.raises(Busy, match="another reconciler runs"):
        reconcile_once(env.bike, config)
    with pytest.raises(Busy, match="lost the reconciler lease"):  # nor may a pass of a reconciler without it
        Reconciler(env.bike, config).reconcile([])
    holder.release()
    done = reconcile_once(env.bike, config)
    assert done.errors == ["source fleet: cannot read nodes.csv: [Errno 2] No such file or directory: 'nodes.csv'"]
    assert env.c.get(env.keys.reconciler) is None


# ============================================ 2. real sources, the command line


def config_dir(tmp_path: Path, redis_server: RedisServer, prefix: str, **kwargs: Any) -> Path:
    folder = write_config(tmp_path / "run", prefix, redis_server.url)
    with open(folder / ".redbike.conf", "a") as conf:
        conf.write(section(**kwargs))
    return folder


def cli(folder: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--config", str(folder / ".redbike.conf"), *args])
    out, err = capsys.readouterr()
    return code, out, err


def rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def write_script(folder: Path, hosts: dict[str, list[str]]) -> None:
    lines = [f"host,{host}," for host in hosts] + [f"db,{db},{host}" for host, dbs in hosts.items() for db in dbs]
    path = folder / "fetch-nodes"
    path.write_text(f"#!{sys.executable}\nprint({chr(10).join(lines)!r})\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_a_script_source_rewritten(tmp_path: Path, redis_server: RedisServer, prefix: str, client: redis.Redis,
                                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="redbike")
    folder = config_dir(tmp_path, redis_server, prefix, source="script ./fetch-nodes")
    monkeypatch.chdir(folder)
    write_script(folder, {"h1": ["d1", "d2"], "h2": ["d3"], "h3": ["d4"]})
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 0, err
    assert "reconciled (whole pass): 7 added, 7 capacities, 7 nodes added" in err
    assert "task scan/h1/d1:A added (family scan" in caplog.text  # who changed what, in the log
    code, out, _ = cli(folder, capsys, "statuses")
    assert sorted(row[0] for row in rows(out)) == ["report/h1:A", "report/h2:A", "report/h3:A", "scan/h1/d1:A",
                                                   "scan/h1/d2:A", "scan/h2/d3:A", "scan/h3/d4:A"]
    assert all(row[1] == "TML" for row in rows(out))  # placed by their schedules

    # h3 is gone, h4 comes: h3's idle tasks vanish, h4's appear and are placed
    write_script(folder, {"h1": ["d1", "d2"], "h2": ["d3"], "h4": ["d5"]})
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 0, err
    assert "task scan/h3/d4:A removed: its node or family is gone" in caplog.text
    code, out, _ = cli(folder, capsys, "nodes")
    assert rows(out) == [["db", "d1", "h1", "1", "0"], ["db", "d2", "h1", "1", "0"], ["db", "d3", "h2", "1", "0"],
                         ["db", "d5", "h4", "1", "0"], ["host", "h1", "", "1", "0"], ["host", "h2", "", "1", "0"],
                         ["host", "h4", "", "1", "0"]]
    keys = client.hkeys(f"{prefix}:schedules")
    assert "scan/h3/d4:A" not in keys and "report/h3:A" not in keys
    assert client.hget(f"{prefix}:statuses", "scan/h4/d5:A").startswith("TML:")
    code, out, _ = cli(folder, capsys, "node", "d5")
    shown = json.loads(out)
    assert shown["path"] == [{"level": "instance", "name": "instance"}, {"level": "host", "name": "h4"},
                             {"level": "db", "name": "d5"}]
    assert shown["capacities"] == {"db_lock@d5": 1} and shown["in_use"] == {}
    assert [t["id"] for t in shown["tasks"]] == ["scan/h4/d5:A"]
    assert cli(folder, capsys, "node", "h3")[:2] == (3, "")
    assert cli(folder, capsys, "node", "a/b")[0] == 2
    client.hset(f"{prefix}:capacities", "db_lock@d1", 7)  # by hand: a pass of the changed nodes keeps it ...
    assert cli(folder, capsys, "nodes", "--reconcile")[2] == "reconciled (changed nodes only): nothing changed\n"
    code, _, err = cli(folder, capsys, "nodes", "--reconcile", "--whole")  # ... a whole pass puts it back
    assert (code, err) == (0, "reconciled (whole pass): 1 capacities\n")
    assert client.hget(f"{prefix}:capacities", "db_lock@d1") == "1"
    assert cli(folder, capsys, "nodes", "--reconcile", "--whole", "--loop")[0] != 0  # one or the other

    # a script that fails keeps the last good list, says why, exits 1
    (folder / "fetch-nodes").write_text(f"#!{sys.executable}\nimport sys\nsys.exit('inventory down')\n")
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 1 and "redbike: source fleet: './fetch-nodes' exited with 1: inventory down" in err
    assert "Traceback" not in err
    assert len(rows(cli(folder, capsys, "nodes")[1])) == 7

    # the guard: two of seven nodes left is more than 50% fewer
    write_script(folder, {"h1": ["d1"]})
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 1 and "returned 2 nodes, 7 before: more than 50% fewer (guard-fraction)" in err
    assert len(rows(cli(folder, capsys, "nodes")[1])) == 7 and len(client.hkeys(f"{prefix}:tasks")) == 7


class Items(BaseHTTPRequestHandler):
    body: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        if self.path != "/items":
            self.send_error(404)
            return
        data = json.dumps(self.body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def items_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (Items,), {"body": {}}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_items_source(tmp_path: Path, redis_server: RedisServer, prefix: str, client: redis.Redis,
                              items_server: ThreadingHTTPServer, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{items_server.server_address[1]}/items"
    folder = config_dir(tmp_path, redis_server, prefix, source=f"http {url}")
    handler: Any = items_server.RequestHandlerClass
    handler.body = {"kind": "ItemList", "apiVersion": "v1", "items": [
        {"level": "host", "name": "h1", "attributes": {"rack": "r7"}}, {"level": "db", "name": "d1", "parent": "h1"}]}
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 0, err
    assert sorted(client.hkeys(f"{prefix}:tasks")) == ["report/h1:A", "scan/h1/d1:A"]
    assert json.loads(cli(folder, capsys, "node", "h1")[1])["attributes"] == {"rack": "r7"}

    handler.body = {"kind": "Item", "apiVersion": "v1", "data": {}}
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 1
    assert f"GET {url}: expected kind 'ItemList', apiVersion 'v1'; got kind 'Item', apiVersion 'v1'" in err
    assert sorted(client.hkeys(f"{prefix}:tasks")) == ["report/h1:A", "scan/h1/d1:A"]  # the last good list
    handler.body = {"kind": "ItemList", "apiVersion": "v2", "items": []}
    assert "got kind 'ItemList', apiVersion 'v2'" in cli(folder, capsys, "nodes", "--reconcile")[2]
    assert len(client.hkeys(f"{prefix}:tasks")) == 2


# ================================= 3. a real worker pool under a node's capacity


def test_tasks_of_one_host_never_run_together(tmp_path: Path, redis_server: RedisServer, prefix: str,
                                              client: redis.Redis, daemons: Daemons, testlog: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = config_dir(tmp_path, redis_server, prefix, source="file nodes.csv", schedule="NOW", host_capacity=1)
    text = (folder / ".redbike.conf").read_text()
    # testworker sleeps 1 s for a job whose id starts "sleep1-"
    text = text.replace("family.scan", "family.sleep1-scan").replace("family.report", "# family.report")
    (folder / ".redbike.conf").write_text(text.replace("source.fleet = file nodes.csv",
                                                       f"source.fleet = file {folder / 'nodes.csv'}"))
    (folder / "nodes.csv").write_text("host,h1,\nhost,h2,\ndb,d1,h1\ndb,d2,h1\ndb,d3,h1\ndb,d4,h2\n")
    daemons.start("work", "testworker:Recorder('A')", "--concurrency", "4", cwd=folder)
    wait_for(lambda: client.pubsub_numsub(f"{prefix}:wake-queue:A")[0][1] >= 1, what="the pool to listen")
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 0, err

    def runs() -> list[dict[str, Any]]:
        return [json.loads(r) for r in client.lrange(testlog, 0, -1)]

    wait_for(lambda: sum(r["event"] == "end" for r in runs()) == 4, timeout=20, what="the four tasks to run")
    spans: dict[str, dict[str, float]] = {}
    for record in runs():
        spans.setdefault(record["job"], {})[record["event"]] = record["at"]
    h1 = sorted((span["start"], span["end"]) for job, span in spans.items() if "/h1/" in job)
    assert len(h1) == 3
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(h1)), f"h1's tasks overlapped: {h1}"
    # the pool did run tasks side by side: h2's with one of h1's
    h2 = next(span for job, span in spans.items() if "/h2/" in job)
    assert any(start < h2["end"] and h2["start"] < end for start, end in h1)
    assert {r: used for r, _, used, _ in client_capacities(client, prefix)} == dict.fromkeys(
        ["host_concurrency@h1", "host_concurrency@h2", "db_lock@d1", "db_lock@d2", "db_lock@d3", "db_lock@d4"], 0)


def test_a_running_task_of_a_removed_host_is_killed_after_the_grace(tmp_path: Path, redis_server: RedisServer,
                                                                    prefix: str, client: redis.Redis, daemons: Daemons,
                                                                    testlog: str, capsys: pytest.CaptureFixture[str]
                                                                    ) -> None:
    folder = config_dir(tmp_path, redis_server, prefix, source="file nodes.csv", schedule="NOW")
    text = (folder / ".redbike.conf").read_text()
    # testworker sleeps an hour on a job whose id starts "hang"
    text = text.replace("family.scan", "family.hang-scan").replace("family.report", "# family.report")
    (folder / ".redbike.conf").write_text(text.replace("kill-orphans-after = 30", "kill-orphans-after = 1").replace(
        "source.fleet = file nodes.csv", f"source.fleet = file {folder / 'nodes.csv'}"))
    (folder / "nodes.csv").write_text("host,h1,\nhost,h2,\ndb,d1,h1\ndb,d2,h2\n")
    worker = daemons.start("work", "testworker:Recorder('A')", "--concurrency", "2", cwd=folder)
    assert cli(folder, capsys, "nodes", "--reconcile")[0] == 0
    started = wait_for(lambda: {r["job"]: r for r in map(json.loads, client.lrange(testlog, 0, -1))
                                if r["event"] == "start"} if client.llen(testlog) >= 2 else None,
                       timeout=20, what="both tasks to start")
    doomed, kept = started["hang-scan/h2/d2:A"], started["hang-scan/h1/d1:A"]

    (folder / "nodes.csv").write_text("host,h1,\ndb,d1,h1\n")  # h2 and its db are gone
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 0 and "1 orphaned" in err, err
    assert os.path.exists(f"/proc/{doomed['pid']}")  # within the grace its run goes on
    wait_for(lambda: time.time() >= float(client.hget(f"{prefix}:orphans", "hang-scan/h2/d2:A")) + 1.5,
             what="the grace to pass")
    code, _, err = cli(folder, capsys, "nodes", "--reconcile")
    assert code == 0 and "1 removed" in err, err
    # The lease ended and the worker's heartbeat (a third of a lease: 5 s) kills the run.
    assert not client.hexists(f"{prefix}:leases", "hang-scan/h2/d2:A")
    wait_for(lambda: not os.path.exists(f"/proc/{doomed['pid']}"), timeout=20, what="the orphan's run to be killed")
    assert os.path.exists(f"/proc/{kept['pid']}") and worker.poll() is None
    assert client.hget(f"{prefix}:usage", "db_lock@d2") in (None, "0")
    wait_for(lambda: "killed: its lease was lost" in daemons.log(worker), what="the worker to log the kill")


def client_capacities(client: redis.Redis, prefix: str) -> list[tuple[str, int | None, int, int]]:
    from redbike import Redbike

    return list(Redbike(prefix=prefix, client=client).capacities())


def test_the_loop_follows_a_file_and_hands_over(tmp_path: Path, redis_server: RedisServer, prefix: str,
                                                client: redis.Redis, daemons: Daemons) -> None:
    folder = config_dir(tmp_path, redis_server, prefix, source="file nodes.csv")
    conf = folder / ".redbike.conf"
    conf.write_text(conf.read_text().replace("source.fleet = file nodes.csv",
                                             "source.fleet = file nodes.csv\nsource.fleet.every = 0.2"))
    nodes = folder / "nodes.csv"
    nodes.write_text("host,h1,\nhost,h2,\ndb,d1,h1\ndb,d2,h2\n")
    first = daemons.start("nodes", "--reconcile", "--loop", cwd=folder)
    task_keys = f"{prefix}:tasks"
    wait_for(lambda: client.hlen(task_keys) == 4, what="the loop to set the tasks")
    second = daemons.start("nodes", "--reconcile", "--loop", cwd=folder)  # stands by
    nodes.write_text("host,h1,\nhost,h2,\ndb,d1,h1\n")
    wait_for(lambda: sorted(client.hkeys(task_keys)) == ["report/h1:A", "report/h2:A", "scan/h1/d1:A"],
             what="d2's task to go")
    holder = client.get(f"{prefix}:nodes:reconciler")
    assert holder is not None and holder.split(":")[1] == str(first.pid)
    first.terminate()
    assert first.wait(10) == 0
    wait_for(lambda: (client.get(f"{prefix}:nodes:reconciler") or "").split(":")[1:2] == [str(second.pid)],
             what="the standby to take over")
    nodes.write_text("host,h1,\nhost,h2,\ndb,d1,h1\ndb,d3,h2\n")
    wait_for(lambda: client.hexists(task_keys, "scan/h2/d3:A"), what="the new leader to add d3's task")
    # the config changes: read again (here on SIGHUP, its mtime kept); a broken one is not used
    stamp = conf.stat().st_mtime_ns
    conf.write_text(conf.read_text().replace("family.report.queue = A", "family.report.queue = B"))
    os.utime(conf, ns=(stamp, stamp))
    second.send_signal(signal.SIGHUP)
    wait_for(lambda: client.hexists(task_keys, "report/h2:B") and not client.hexists(task_keys, "report/h2:A"),
             what="the report tasks to move to queue B")
    conf.write_text(conf.read_text().replace("levels = host > db", "levels = host > > db"))
    wait_for(lambda: "node config not reloaded: " in daemons.log(second), what="the broken config to be refused")
    assert "levels: missing level name" in daemons.log(second)
    nodes.write_text("host,h1,\nhost,h2,\ndb,d1,h1\ndb,d3,h2\ndb,d4,h2\n")
    wait_for(lambda: client.hexists(task_keys, "scan/h2/d4:A"), what="the old config to go on")
    second.terminate()
    assert second.wait(10) == 0
    assert client.get(f"{prefix}:nodes:reconciler") is None
    assert "task scan/h1/d2:A removed" not in daemons.log(first)  # d2 hung from h2
    assert "task scan/h2/d2:A removed: its node or family is gone" in daemons.log(first)


def test_the_example_fetcher_and_items_source(tmp_path: Path, redis_server: RedisServer, prefix: str,
                                              client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    fetcher = f"script {sys.executable} {ROOT / 'examples' / 'node_fetcher.py'} 3 2"
    folder = config_dir(tmp_path, redis_server, prefix, source=fetcher)
    assert cli(folder, capsys, "nodes", "--reconcile")[0] == 0
    assert len(rows(cli(folder, capsys, "nodes", "--level=db")[1])) == 6
    assert client.hexists(f"{prefix}:tasks", "scan/db-host-3/db-host-3-db2:A")

    port = free_port()
    (folder / "served.csv").write_text("host,h1,\ndb,d1,h1,shard=4\n")
    server = subprocess.Popen([sys.executable, str(ROOT / "examples" / "items_source.py"), "served.csv", str(port)],
                              cwd=folder, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and "serving" in server.stdout.readline()
        conf = folder / ".redbike.conf"
        conf.write_text(conf.read_text().replace(fetcher, f"http http://127.0.0.1:{port}/items")
                        .replace("[redbike-nodes]", "[redbike-nodes]\nguard-fraction = 1"))
        code, _, err = cli(folder, capsys, "nodes", "--reconcile")
        assert code == 0, err
        assert sorted(client.hkeys(f"{prefix}:tasks")) == ["report/h1:A", "scan/h1/d1:A"]
        assert json.loads(cli(folder, capsys, "node", "d1")[1])["attributes"] == {"shard": "4"}
    finally:
        server.terminate()
        server.wait(10)


def test_the_leading_dispatcher_reconciles(tmp_path: Path, redis_server: RedisServer, prefix: str,
                                           client: redis.Redis, daemons: Daemons) -> None:
    folder = config_dir(tmp_path, redis_server, prefix, source="file nodes.csv")
    conf = folder / ".redbike.conf"
    conf.write_text(conf.read_text().replace("source.fleet = file nodes.csv",
                                             "source.fleet = file nodes.csv\nsource.fleet.every = 0.2"))
    nodes = folder / "nodes.csv"
    nodes.write_text("host,h1,\ndb,d1,h1\n")
    task_keys, lease = f"{prefix}:tasks", f"{prefix}:nodes:reconciler"

    def pid_of(key: str) -> str:
        """The pid in a lease's token (dispatcher: epoch:host:pid:nonce; reconciler: host:pid:nonce)."""
        return (client.get(key) or "::").split(":")[-2]

    leader = daemons.start("dispatch", "--nodes", cwd=folder)
    wait_for(lambda: client.hlen(task_keys) == 2, what="the dispatcher's reconciler to set the tasks")
    standby = daemons.start("dispatch", "--nodes", cwd=folder)
    wait_for(lambda: "started" in daemons.log(standby), what="the standby to start")
    assert pid_of(f"{prefix}:dispatcher") == pid_of(lease) == str(leader.pid)
    leader.terminate()
    assert leader.wait(10) == 0
    wait_for(lambda: pid_of(f"{prefix}:dispatcher") == str(standby.pid), what="the standby to lead")
    nodes.write_text("host,h1,\ndb,d1,h1\ndb,d2,h1\n")
    wait_for(lambda: client.hexists(task_keys, "scan/h1/d2:A"), what="the new leader to reconcile")
    assert pid_of(lease) == str(standby.pid)
    standby.terminate()
    assert standby.wait(10) == 0


def test_the_loop_reconciles_only_while_its_process_leads(env: Env, tmp_path: Path) -> None:
    nodes = tmp_path / "nodes.csv"
    nodes.write_text("host,h1,\ndb,d1,h1\n")
    config = node_config(tmp_path, source=f"file {nodes}")
    leading, stopping = threading.Event(), threading.Event()
    asked: list[bool] = []

    def leads() -> bool:
        asked.append(leading.is_set())
        return asked[-1]

    thread = threading.Thread(target=reconcile_loop, args=(env.bike, config),
                              kwargs={"stop": stopping.is_set, "idle": 0.02, "leads": leads})
    thread.start()
    try:
        wait_for(lambda: len(asked) >= 5, what="the loop to ask a few times")
        assert tasks(env) == {} and env.c.get(env.keys.reconciler) is None
        leading.set()
        wait_for(lambda: len(tasks(env)) == 2, what="the tasks, once it leads")
        assert env.c.get(env.keys.reconciler) is not None
        leading.clear()
        wait_for(lambda: env.c.get(env.keys.reconciler) is None, what="the lease given back")
    finally:
        stopping.set()
        thread.join(10)
