"""What a claim costs Redis while many jobs wait for a saturated resource.

For N jobs parked on a resource at capacity (host:busy, capacity 1, held by
a running job), a worker pool working both that resource's queue (W) and
another queue (F) claims jobs of F, which need another resource with room
(host:free; its capacity is checked, and that no job waits for it). The claim
script looks at W's woken jobs and list before it finds F's job, so if
anything in it scanned the waiting jobs, its cost would grow with N.

Measured per claim, in five rounds of a fifth of the claims each (after
CONFIG RESETSTAT; the round with the least server time counts): the Redis
commands run (INFO commandstats: those inside the script, and the EVALSHA
calls themselves), the server-side time of the claim script (cmdstat_evalsha
usec_per_call), and the wall time of WorkerPool.claim (one round trip, on
loopback).

Section 7 of `python -m bench`; standalone, it starts its own redis-server
(bench/server.py) and kills it at the end:

    python -m bench.claim_cost [--sizes 10,1000,100000] [--claims 1000]
"""

from __future__ import annotations

import argparse
import time

import redis

from redbike import Redbike, RoundRobin
from redbike.claims import Rotation
from redbike.supervisor import WorkerPool

from .server import RedisServer

BUSY, FREE = "host:busy", "host:free"
PIPELINE = 2000


def set_many(bike: Redbike, jobids: list[str], needs: str) -> None:
    """bike.set(jobid, 'NOW', needs=needs) for each job: set_alike, the same set.lua pipelined."""
    for start in range(0, len(jobids), PIPELINE):
        results = bike.set_alike([(jobid, needs) for jobid in jobids[start:start + PIPELINE]], "NOW")
        if any(result != "PLACED" for result in results.values()):
            raise RuntimeError(f"set NOW answered {set(map(str, results.values()))}")


def commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    return {name.removeprefix("cmdstat_"): stats for name, stats in client.info("commandstats").items()}


ROUNDS = 5


def measure(client: redis.Redis, parked: int, claims: int, busy: str = f"{BUSY}=1", free: str = f"{FREE}=1",
            capacities: dict[str, int] | None = None) -> dict[str, float]:
    """``busy``: the needs of the holder and the parked jobs, ``free`` those of
    the jobs claimed; ``capacities``: every resource's (default: BUSY 1 and
    FREE room for every claim). bench/nodes_scale.py gives needs on a 3-level path."""
    client.flushall()
    bike = Redbike(RoundRobin("W:F"), prefix="bench", client=client)
    for resource, capacity in (capacities or {BUSY: 1, FREE: 10 * claims}).items():
        bike.set_capacity(resource, capacity)
    pool = WorkerPool(client, bike.keys, RoundRobin("W:F"), concurrency=1)
    rotation = Rotation(pool.queue_names)
    slot = pool.claims.slot(0, "bench")
    # The resource is saturated: one running job holds it ...
    set_many(bike, ["holder:W"], busy)
    holder = slot.claim(rotation).claimed
    assert holder is not None and holder.lease.jobid == "holder:W"
    # ... and `parked` jobs wait for it (a claim parks them, 64 per script call).
    set_many(bike, [f"wait{i}:W" for i in range(parked)], busy)
    started = time.perf_counter()
    assert slot.claim(rotation).claimed is None
    parking = time.perf_counter() - started
    assert client.zcard(bike.keys.parked) == parked and client.llen(bike.keys.queue("W")) == 0
    # Jobs of a resource with room to spare, claimed one by one.
    set_many(bike, [f"free{i}:F" for i in range(claims + 1)], free)
    assert slot.claim(rotation).claimed.lease.jobid.startswith("free")  # warm-up (script cache)
    # In five rounds: the least disturbed round's figures count (this VM's
    # speed drifts by more than the effect looked for).
    rounds = []
    for _ in range(ROUNDS):
        client.config_resetstat()
        wall = 0.0
        for _ in range(claims // ROUNDS):
            started = time.perf_counter()
            job = slot.claim(rotation).claimed
            wall += time.perf_counter() - started
            assert job is not None and job.lease.jobid.startswith("free"), job
        stats = commandstats(client)
        inside = sum(s["calls"] for name, s in stats.items() if name not in ("evalsha", "config", "info"))
        rounds.append((stats["evalsha"]["usec_per_call"], wall, stats["evalsha"]["calls"], inside))
    server_usec, wall, evalshas, inside = min(rounds)
    claims = claims // ROUNDS
    assert client.zcard(bike.keys.parked) == parked  # none of them was touched
    return {
        "parked": parked,
        "parking_s": parking,
        "claims": claims,
        "evalsha_per_claim": evalshas / claims,
        "commands_per_claim": inside / claims,
        "server_usec": server_usec,
        "wall_usec": wall / claims * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,1000,100000", help="numbers of parked jobs, comma-separated")
    parser.add_argument("--claims", type=int, default=1000, help="claims measured per size")
    args = parser.parse_args()
    server = RedisServer().start()
    client = server.client()
    try:
        version = client.info("server")["redis_version"]
        print(f"redis-server {version} on 127.0.0.1:{client.connection_pool.connection_kwargs['port']}, "
              f"{args.claims} claims per row")
        print()
        header = ("parked jobs", "round trips/claim", "commands/claim", "server us/claim", "wall us/claim",
                  "parking them")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---:" for _ in header) + "|")
        for size in (int(s) for s in args.sizes.split(",")):
            row = measure(client, size, args.claims)
            print(f"| {row['parked']:,} | {row['evalsha_per_claim']:.2f} | {row['commands_per_claim']:.1f} | "
                  f"{row['server_usec']:.1f} | {row['wall_usec']:.0f} | {row['parking_s']:.2f} s |", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
