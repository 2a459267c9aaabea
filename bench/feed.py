"""Feeding N one-off jobs through one feeder and two worker slots (issue #10).

    python -m bench.feed                      # 10,000,000 items
    python -m bench.feed --items 1000000      # shorter

Starts its own Redis server (bench/server.py), measures first the no-op drain
rate of the same two slots on queued jobs (redbike_bench.drain), then runs
``redbike feed bench.feed:items --queue=A --wait`` beside ``redbike work
bench.noop:Noop('A') --concurrency 2`` and samples, every --every seconds:
items done (the tally file), the feeder's RSS, Redis used_memory and the
round trips Redis received (INFO total_reads_processed). Prints one JSON
object: the samples, items/s (over the whole run, from the feeder's start
to its exit, and steady: from 10% to 90% of the items done), the drain rate
and the ratios, memory from 10% to 90% of the items done (after warm-up,
before the last jobs drain) as min/max and its spread, and round
trips per item (all clients: the workers' one per job included, and the
drain's per job to compare)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from redbike.feed import Item, Total, feed_source

from .procs import Proc, proc_status, redbike_argv
from .redbike_bench import Workspace, drain
from .server import RedisServer, snapshot
from .tally import count


@feed_source
def items(last: int | None = None, count: str = "10000000") -> Iterator[Any]:
    """Items i0, i1, ... with their number as cursor."""
    start = 0 if last is None else last + 1
    yield Total(int(count) - start)
    for i in range(start, int(count)):
        yield Item(f"i{i}", cursor=i)


def spread(values: list[int]) -> dict[str, float]:
    low, high = min(values), max(values)
    return {"min": low, "max": high, "spread_pct": (high - low) / low * 100 if low else 0.0}


def run(n: int, every: float, drain_jobs: int, batch: int, high_water: int) -> dict[str, Any]:
    server = RedisServer().start()
    try:
        drained = drain(server, drain_jobs, concurrency=2)
        client = server.client()
        client.flushall()
        ws = Workspace(server)
        try:
            ws.worker("bench.noop:Noop('A')", 2)
            feeder = Proc(redbike_argv(ws.config, "feed", "bench.feed:items", f"count={n}", "--queue=A", "--wait",
                                       "--name=bench", f"--batch={batch}", f"--high-water={high_water}"),
                          ws.env, cwd=ws.folder, name="redbike-feed")
            ws.procs.append(feeder)
            start = snapshot(client)
            samples = []
            while feeder.alive():
                time.sleep(every)
                now = snapshot(client)
                samples.append({"t": round(now.at - start.at, 1), "done": count(ws.tally),
                                "feeder_rss": proc_status(feeder.pid).get("VmRSS", 0),
                                "used_memory": now.used_memory, "round_trips": now.reads - start.reads})
            end = snapshot(client)
            done = count(ws.tally)
            if feeder.process.returncode != 0 or done < n:
                raise RuntimeError(f"the feed ended with {feeder.process.returncode} after {done} items:\n"
                                   f"{feeder.output()}")
            seconds = samples[-1]["t"] if samples else end.at - start.at
            # The steady rate: from the sample where 10% were done to the one where 90% were.
            steady = [s for s in samples if n / 10 <= s["done"] <= n * 9 / 10]
            steady_rate = ((steady[-1]["done"] - steady[0]["done"]) / (steady[-1]["t"] - steady[0]["t"])
                           if len(steady) > 1 and steady[-1]["t"] > steady[0]["t"] else None)
            warm = [s for s in steady if s["feeder_rss"]]  # after warm-up, before the last jobs drain
            return {
                "items": n, "batch": batch, "high_water": high_water, "seconds": seconds,
                "items_per_s": n / seconds, "steady_items_per_s": steady_rate,
                "drain_jobs_per_s": drained["jobs_per_s"], "of_drain": n / seconds / drained["jobs_per_s"],
                "steady_of_drain": steady_rate / drained["jobs_per_s"] if steady_rate else None,
                "round_trips_per_item": (end.reads - start.reads) / n,
                "drain_round_trips_per_job": drained["round_trips_per_job"],
                "feeder_rss_after_warmup": spread([s["feeder_rss"] for s in warm]) if warm else None,
                "redis_used_memory_after_warmup": spread([s["used_memory"] for s in warm]) if warm else None,
                "feeder_summary": feeder.output(400).strip().splitlines()[-1:],
                "samples": samples,
            }
        finally:
            ws.close()
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--drain-jobs", type=int, default=100_000, help="queued jobs the no-op drain is timed on")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--high-water", type=int, default=10_000)
    args = parser.parse_args(argv)
    json.dump(run(args.items, args.every, args.drain_jobs, args.batch, args.high_water), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
