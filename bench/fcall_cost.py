"""Redis's own time per finish+claim, EVALSHA against FCALL (Redis 7+, Valkey).

    REDBIKE_BENCH_REDIS_SERVER=/usr/bin/redis-server python -m bench.fcall_cost [--batches 10] [--jobs 1000]

One slot, driven in this process on a connection of its own (as a worker's
slot child drives it), ends each run and claims the next no-op job in one
call, in batches that alternate between the two commands (the same Lua:
see README, "Redis Functions"). Per batch, INFO commandstats' usec_per_call
of the command: Redis's time inside the call, which the host's drift
touches less than a drain rate. Prints the median and the least of the
batches per command; on a server without functions, says so and exits 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from redbike import Redbike, RoundRobin
from redbike.claims import Rotation
from redbike.shardclaims import slot_connections
from redbike.states import OK
from redbike.supervisor import WorkerPool

from .server import RedisServer

COMMANDS = ("evalsha", "fcall")


def measure(server: RedisServer, batches: int, jobs: int) -> dict[str, list[float]]:
    """usec_per_call of each command, per batch (``batches`` of each, ``jobs`` calls per batch)."""
    client = server.client()
    bike = Redbike(RoundRobin("A"), prefix="bench", client=client)
    total = (batches * jobs + 1) * len(COMMANDS) + 1
    for start in range(0, total, 2000):
        bike.set_alike([(f"j{n}:A", "") for n in range(start, min(total, start + 2000))], "NOW")
    pool = WorkerPool(client, bike.keys, RoundRobin("A"), concurrency=1)
    slot = pool.claims.slot(0, pool.worker_id(0), slot_connections(pool.claims)[0])
    rotation = Rotation(pool.queue_names)
    job = slot.claim(rotation).claimed  # the first call: loads the function library if the server has functions
    scripts = slot.space.scripts
    if not scripts.fcall:
        raise SystemExit(f"redis-server {server.version()} has no Redis Functions: nothing to compare")
    found: dict[str, list[float]] = {command: [] for command in COMMANDS}
    for command in COMMANDS:  # once each first: EVALSHA's script loaded (NOSCRIPT), not counted
        scripts.fcall = command == "fcall"
        job = slot.finish(job, OK, "", rotation).claimed
    for _ in range(batches):
        for command in COMMANDS:
            scripts.fcall = command == "fcall"
            client.config_resetstat()
            for _ in range(jobs):
                assert job is not None
                job = slot.finish(job, OK, "", rotation).claimed
            stats = client.info("commandstats")[f"cmdstat_{command}"]
            assert int(stats["calls"]) == jobs, (command, stats)  # every call went as that command
            found[command].append(float(stats["usec_per_call"]))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, default=10, help="batches per command (default 10)")
    parser.add_argument("--jobs", type=int, default=1000, help="finish+claim calls per batch (default 1000)")
    args = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        found = measure(server, args.batches, args.jobs)
        print(f"redis-server {server.version()}, {args.batches} batches of {args.jobs} per command")
    finally:
        server.stop()
    for command, values in found.items():
        print(f"{command}: median {statistics.median(values):.1f} us per call, least {min(values):.1f}")
    change = statistics.median(found["fcall"]) / statistics.median(found["evalsha"]) - 1
    print(f"FCALL against EVALSHA (medians): {change:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
