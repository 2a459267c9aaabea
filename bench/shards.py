"""Shards over primaries (issue #12): the drain rate with 1, 2 and 3 Redis
Cluster primaries, and each primary's Redis CPU per job.

For P in ``--primaries`` (default 1,2,3) it starts P cluster-enabled
``redis-server`` processes (Debian's Redis 7, no replicas, persistence off,
the 16,384 slots split evenly with CLUSTER ADDSLOTSRANGE), an installation
of ``--shards`` shards (default 6: on evenly spaced slots, so as many on
each primary at every P), fills it with
``--jobs`` NOW jobs (spread over the shards by their ids) and drains them
with ``--pools`` ``redbike work`` processes of ``--concurrency`` slots each,
whose slots claim from every shard.

Per P: jobs/s over the drain (from the first finished job to the last,
counted by the tally file), and per primary: its jobs (those of its shards),
its Redis CPU per job (INFO cpu) and how busy it was (CPU seconds per second
of the drain). The model: a primary serves at most 1 / (its Redis CPU per
job) jobs per second, so a cluster of P primaries serves up to P times that,
when the workers (their CPU: bench/README) and the network keep up. On this
2-core VM the workers and the primaries share two cores, so the measured
total cannot grow with P; the per-primary figures are what scale.

    python -m bench.shards [--primaries 1,2,3] [--shards 6] [--jobs 20000] [--pools 1] [--concurrency 2] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import redis
from redis.crc import key_slot

from redbike.sharded import ShardedRedbike
from redbike.shards import Shards, shard_of

from .noop import Noop
from .procs import Proc, bench_env, redbike_argv, wait_until
from .server import free_port
from .tally import count

SLOTS = 16384
REDIS7 = "/usr/bin/redis-server"


@dataclass
class Node:
    port: int
    bus: int  # the cluster bus port (its own, not port + 10000: that may be taken)
    process: subprocess.Popen

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, decode_responses=True)

    def cpu(self) -> float:
        info = self.client().info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def slot_ranges(primaries: int) -> list[tuple[int, int]]:
    """The slots of each primary: contiguous, as even as can be."""
    bounds = [SLOTS * n // primaries for n in range(primaries + 1)]
    return [(bounds[n], bounds[n + 1] - 1) for n in range(primaries)]


def owner(slot: int, primaries: int) -> int:
    return next(n for n, (low, high) in enumerate(slot_ranges(primaries)) if low <= slot <= high)


def start_cluster(folder: str, primaries: int) -> list[Node]:
    nodes = []
    for n in range(primaries):
        port, bus = free_port(), free_port()
        home = os.path.join(folder, f"node{n}")
        os.makedirs(home)
        process = subprocess.Popen(
            [REDIS7, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
             "--save", "", "--appendonly", "no", "--dir", home],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes.append(Node(port, bus, process))
    for node in nodes:
        wait_until(lambda node=node: _pings(node), 20, what=f"redis-server on port {node.port}")
    for node, (low, high) in zip(nodes, slot_ranges(primaries), strict=True):
        node.client().execute_command("CLUSTER ADDSLOTSRANGE", low, high)
    for node in nodes[1:]:
        nodes[0].client().execute_command("CLUSTER MEET", "127.0.0.1", node.port, node.bus)
    for node in nodes:
        wait_until(lambda node=node: _cluster_ok(node), 30, what="cluster_state:ok")
    return nodes


def _pings(node: Node) -> bool:
    try:
        return bool(node.client().ping())
    except redis.ConnectionError:
        return False


def _cluster_ok(node: Node) -> bool:
    info = node.client().execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    return (info.get("cluster_state") if isinstance(info, dict) else None) == "ok" or "cluster_state:ok" in str(info)


def run_once(primaries: int, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="redbike-bench-shards-")
    nodes = start_cluster(folder, primaries)
    procs: list[Proc] = []
    try:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)
        config = os.path.join(folder, "bench.conf")
        with open(config, "w") as handle:
            handle.write(f"[redbike]\nprefix = {prefix}\nshards = {args.shards}\n\n[redbike-redis]\nurl = {url}\n")
        from redbike.config import load_config

        shards = Shards.connect(load_config(config).redis, prefix, args.shards)
        bike = ShardedRedbike(Noop("A"), shards)
        for start in range(0, args.jobs, 1000):
            results = bike.set_alike([(f"{i}:A", None) for i in range(start, min(args.jobs, start + 1000))], "NOW")
            if any(r != "PLACED" for r in results.values()):
                raise RuntimeError(f"set NOW answered {set(results.values())}")
        shard_owner = [owner(key_slot(keys.prefix.encode()), primaries) for keys in shards.keys]
        jobs_of = [0] * primaries
        for i in range(args.jobs):
            jobs_of[shard_owner[shard_of(f"{i}:A", args.shards)]] += 1
        tally = os.path.join(folder, "tally")
        env = bench_env(BENCH_TALLY=tally)
        for n in range(args.pools):
            procs.append(Proc(redbike_argv(config, "work", "bench.noop:Noop('A')", "--concurrency",
                                           str(args.concurrency)), env, cwd=folder, name=f"redbike-work-{n}"))
        wait_until(lambda: count(tally) > 0, 60, what="the first job")
        started, done0, cpu0 = time.monotonic(), count(tally), [node.cpu() for node in nodes]
        wait_until(lambda: count(tally) >= args.jobs, 600, every=0.05, what="every job")
        seconds, done1, cpu1 = time.monotonic() - started, count(tally), [node.cpu() for node in nodes]
        jobs = done1 - done0
        share = jobs / args.jobs  # the measured part of each primary's jobs (the first ones ran before it)
        per_primary = [{"shards": shard_owner.count(p), "jobs": jobs_of[p],
                        "redis_cpu_us_per_job": (cpu1[p] - cpu0[p]) / (jobs_of[p] * share) * 1e6,
                        "busy": (cpu1[p] - cpu0[p]) / seconds,
                        "jobs_per_s": jobs_of[p] * share / seconds} for p in range(primaries)]
        return {"primaries": primaries, "shards": args.shards, "jobs": args.jobs, "measured_jobs": jobs,
                "seconds": seconds, "jobs_per_s": jobs / seconds, "per_primary": per_primary,
                "ceiling_jobs_per_s": sum(1e6 / p["redis_cpu_us_per_job"] for p in per_primary)}
    finally:
        for proc in procs:
            proc.stop()
            proc.cleanup()
        for node in nodes:
            node.process.kill()
            node.process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--primaries", default="1,2,3")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--pools", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    counts = [int(p) for p in args.primaries.split(",")]
    results = [run_once(p, args, "bench") for p in counts]
    print(f"{args.jobs} no-op jobs over {args.shards} shards, {args.pools} pool(s) x {args.concurrency} slots")
    print("| primaries | jobs/s | per primary: jobs/s, Redis CPU us/job, busy | ceiling (sum of 1/CPU per job) |")
    print("|---|---|---|---|")
    for r in results:
        each = "; ".join(f"{p['jobs_per_s']:,.0f}, {p['redis_cpu_us_per_job']:.0f} us, {p['busy']:.0%}"
                         for p in r["per_primary"])
        print(f"| {r['primaries']} | {r['jobs_per_s']:,.0f} | {each} | {r['ceiling_jobs_per_s']:,.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
