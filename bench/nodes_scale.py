"""The node model at scale (issue #9): reconciliation of many nodes, and the
claim cost of a task whose needs lie on a 3-level path.

A fleet of HOSTS hosts with DBS databases each (``--dbs`` db nodes in all,
default 100,000, under a tenth as many hosts), three job families on the db
level (300,000 tasks), needs on every level of the path (``scans@instance``,
``host_concurrency@HOST``, ``db_lock@DB``), read from a ``file`` source.
Three passes, each ``reconcile_once`` in a child process of its own (as
``redbike nodes --reconcile`` runs it):

1. the full load, from an empty Redis;
2. a churn pass: ``--churn`` (default 2%) of the db nodes replaced by as
   many new ones (their tasks unset, the new ones set);
3. a pass with nothing changed.

Per pass: wall time, the round trips Redis counted (INFO stats
total_reads_processed: one per request a client sends, a pipeline being
one), the child's own count of requests sent and pipelines executed, the
commands Redis ran (INFO commandstats, those inside scripts too), Redis'
CPU and the child's (user and system, the kernel's rusage), and the
child's peak RSS (the kernel's ru_maxrss of the process). After the full
load: Redis bytes per task (INFO used_memory delta over the tasks, their
nodes and capacities included).

Then the claim cost with the forest (bench/claim_cost.py's measurement): jobs
parked on a saturated host, claims of tasks needing room on all three levels
(instance > host > db), at ``--parked`` jobs parked.

    python -m bench.nodes_scale [--dbs 100000] [--churn 0.02] [--parked 10,1000,100000] [--claims 1000]

It starts its own redis-server (bench/server.py) and kills it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from .server import RedisServer, calibrate, delta, snapshot

PREFIX = "bench"
FAMILIES = ("scan", "vacuum", "backup")
DBS_PER_HOST = 10
CONF = """\
[redbike-nodes]
levels = host > db
capacity.instance = scans=1000
capacity.host = host_concurrency=2
capacity.db = db_lock=1
source.fleet = file {nodes}
kill-orphans-after = 60
""" + "".join(f"""\
family.{name} = db
family.{name}.schedule = CRON_TZ=UTC {minute} 3 * * *
family.{name}.queue = batch
family.{name}.needs.instance = scans=1
family.{name}.needs.host = host_concurrency=1
family.{name}.needs.db = db_lock=1
""" for minute, name in enumerate(FAMILIES))


def write_fleet(path: Path, dbs: int, churned: int = 0) -> None:
    """``dbs`` db nodes, DBS_PER_HOST per host; ``churned``: the first that
    many replaced by as many new ones (on the same hosts)."""
    hosts = (dbs + DBS_PER_HOST - 1) // DBS_PER_HOST
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(f"host,h{h},\n" for h in range(hosts))
        for d in range(dbs):
            name = f"new{d}" if d < churned else f"d{d}"
            out.write(f"db,{name},h{d // DBS_PER_HOST}\n")


# ------------------------------------------------------------------ the child


def child(url: str, conf: str) -> None:
    """One pass, as `redbike nodes --reconcile` runs it (reconcile_once: the
    source read and parsed, then Reconciler.reconcile, timed apart), counting what it sends."""
    from redbike import Redbike
    from redbike.nodeconfig import load_node_config
    from redbike.nodeloop import reconcile_once

    sent = {"requests": 0, "pipelines": 0}
    send = redis.connection.AbstractConnection.send_packed_command
    execute = redis.client.Pipeline.execute

    def counting_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        sent["requests"] += 1
        return send(self, *args, **kwargs)

    def counting_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        sent["pipelines"] += 1
        return execute(self, *args, **kwargs)

    from redbike.reconcile import Reconciler

    timed = {"reconcile": 0.0}
    reconcile = Reconciler.reconcile

    def timed_reconcile(self: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return reconcile(self, *args, **kwargs)
        finally:
            timed["reconcile"] += time.perf_counter() - started

    Reconciler.reconcile = timed_reconcile  # type: ignore[method-assign]
    redis.connection.AbstractConnection.send_packed_command = counting_send  # type: ignore[method-assign]
    redis.client.Pipeline.execute = counting_execute  # type: ignore[method-assign]
    config = load_node_config(conf)
    assert config is not None
    bike = Redbike(prefix=PREFIX, redis_config={"url": url})
    bike.clock()  # the clock's own first read is not the pass's
    sent["requests"] = 0
    started = time.perf_counter()
    done = reconcile_once(bike, config)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "reconcile_seconds": timed["reconcile"], **sent, "summary": done.summary(), "whole": done.whole,
                      "errors": done.errors[:5],
                      "added": len(done.added), "removed": len(done.removed)}))


def run_pass(server: RedisServer, conf: Path) -> dict[str, Any]:
    """A pass in a child process: its report, what Redis counted, its peak RSS."""
    client = server.client()
    before = snapshot(client)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "bench.nodes_scale", "--child", server.url, str(conf)],
                               stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert process.stdout is not None
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    after = snapshot(client)
    if process.returncode != 0:
        raise RuntimeError(f"the reconciling child exited {process.returncode}")
    report = json.loads(out.strip().splitlines()[-1])
    counted = delta(before, after)
    report.update(process_seconds=wall, round_trips=counted.round_trips, commands=counted.total,
                  by_command=dict(sorted(counted.commands.items(), key=lambda kv: -kv[1])[:8]),
                  redis_cpu=counted.cpu, child_cpu=usage.ru_utime + usage.ru_stime, peak_rss_mb=usage.ru_maxrss / 1024,
                  used_memory=after.used_memory, memory_delta=after.used_memory - before.used_memory)
    return report


def reconcile_scale(server: RedisServer, dbs: int, churn: float, say: Any = print) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="redbike-nodes-scale-"))
    nodes, conf = folder / "nodes.csv", folder / "nodes.conf"
    conf.write_text(CONF.format(nodes=nodes))
    server.client().flushall()
    calibrate(server.client())
    results: dict[str, Any] = {"dbs": dbs, "hosts": (dbs + DBS_PER_HOST - 1) // DBS_PER_HOST,
                               "tasks": dbs * len(FAMILIES), "churned_dbs": int(dbs * churn)}
    write_fleet(nodes, dbs)
    full = results["full"] = run_pass(server, conf)
    say(f"full load: {full['summary']} in {full['seconds']:.2f} s")
    results["bytes_per_task"] = full["memory_delta"] / results["tasks"]
    write_fleet(nodes, dbs, churned=results["churned_dbs"])
    churned = results["churn"] = run_pass(server, conf)
    say(f"churn: {churned['summary']} in {churned['seconds']:.2f} s")
    same = results["unchanged"] = run_pass(server, conf)
    say(f"unchanged: {same['summary']} in {same['seconds']:.2f} s")
    client = server.client()
    results["stored_tasks"] = client.hlen(f"{PREFIX}:tasks")
    results["stored_nodes"] = client.hlen(f"{PREFIX}:nodes")
    return results


# ------------------------------------------------------------------ the claim with a 3-level path


def claim_path(server: RedisServer, parked: list[int], claims: int) -> list[dict[str, float]]:
    """bench/claim_cost.py's measurement with needs on instance > host > db:
    jobs parked on a saturated host (its capacity 1, held), claims of jobs
    needing room on the instance, another host and a db (each with a capacity)."""
    from .claim_cost import measure

    busy = "scans@instance=1,host_concurrency@busy=1,db_lock@busydb=1"
    free = "scans@instance=1,host_concurrency@free=1,db_lock@freedb=1"
    rows = []
    for size in parked:
        capacities = {"scans@instance": 10 * claims + size + 2, "host_concurrency@busy": 1,
                      "db_lock@busydb": size + 2, "host_concurrency@free": 10 * claims,
                      "db_lock@freedb": 10 * claims}
        rows.append(measure(server.client(), size, claims, busy=busy, free=free, capacities=capacities))
    return rows


# ------------------------------------------------------------------ the report


def report(results: dict[str, Any]) -> str:
    lines = [(f"{results['dbs']:,} db nodes under {results['hosts']:,} hosts, {len(FAMILIES)} families: "
             f"{results['tasks']:,} tasks; churn: {results['churned_dbs']:,} dbs replaced"), ""]
    header = ("pass", "changes", "seconds (of which reconcile())", "Redis read events", "requests sent", "pipelines", "commands",
              "Redis CPU s", "reconciler CPU s", "peak RSS MB")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name in ("full", "churn", "unchanged"):
        p = results[name]
        lines.append(f"| {name} ({'whole' if p['whole'] else 'changes only'}) | {p['summary']} | {p['seconds']:.2f} ({p['reconcile_seconds']:.2f}) | {p['round_trips']:,} | "
                     f"{p['requests']:,} | {p['pipelines']:,} | {p['commands']:,} | {p['redis_cpu']:.2f} | {p['child_cpu']:.2f} | "
                     f"{p['peak_rss_mb']:.0f} |")
    lines += ["", f"Redis bytes per task (nodes and capacities included): {results['bytes_per_task']:.0f}",
              f"stored: {results['stored_tasks']:,} tasks, {results['stored_nodes']:,} nodes"]
    goals = (results["full"]["seconds"] < 30, results["churn"]["seconds"] < 2)
    lines.append(f"goals: full load < 30 s {'met' if goals[0] else 'MISSED'}, "
                 f"churn pass < 2 s {'met' if goals[1] else 'MISSED'}")
    if results.get("claims"):
        lines += ["", "claim with needs on instance > host > db:", "",
                  "| parked jobs | round trips/claim | commands/claim | server us/claim | wall us/claim |",
                  "|---:|---:|---:|---:|---:|"]
        for row in results["claims"]:
            lines.append(f"| {row['parked']:,} | {row['evalsha_per_claim']:.2f} | {row['commands_per_claim']:.1f} | "
                         f"{row['server_usec']:.1f} | {row['wall_usec']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.nodes_scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dbs", type=int, default=100_000, help="db nodes (a tenth as many hosts)")
    parser.add_argument("--churn", type=float, default=0.02, help="fraction of the db nodes replaced")
    parser.add_argument("--parked", default="10,1000,100000", help="jobs parked, for the claim cost ('' for none)")
    parser.add_argument("--claims", type=int, default=1000, help="claims measured per size")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        print(f"redis-server {server.version()} on 127.0.0.1:{server.port}", flush=True)
        results = reconcile_scale(server, args.dbs, args.churn)
        sizes = [int(size) for size in args.parked.split(",") if size]
        results["claims"] = claim_path(server, sizes, args.claims)
        print(report(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
