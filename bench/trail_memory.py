"""What the job trail and the job record cost in Redis memory with many jobs.

For N jobs (default 1,000,000), each with a full trail (trail-length events
plus as many more as it holds before its trim (half as many again, less one):
the most it ever holds) of typical events, written by lib.lua's own note()
(a script that runs the library, as every redbike script does:
scripts.source_of) after its
job record, in the same value: INFO used_memory before and after, per job
and in all.

    python -m bench.trail_memory [--jobs 1000000] [--trail-length 10]

It starts its own redis-server (bench/server.py) and kills it at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from redbike.keys import Keys
from redbike.records import JobRecord, encode_job, trail_of
from redbike.scripts import TRAIL_LENGTH, source_of

from .server import RedisServer

BATCH = 2000  # jobs per script call

# One job's typical events: it was set, then ran again and again (a run event
# each: occurrence, attempt, token, worker, claim time, outcome, next time).
WRITE = """
local first = tonumber(ARGV[6])
for i = first, first + tonumber(ARGV[7]) - 1 do
  local jobid = 'job' .. i .. ':A'
  local record = {string.match(ARGV[5], L.RECORD)}
  record.trail = table.remove(record)
  L.note(record, 'set', 'ops@host-17', 'TML', '', 'once', '0', '*/5 * * * *')
  for run = 1, tonumber(ARGV[8]) - 1 do
    L.note(record, 'run', L.NOW, '1', '9f86d081884c7d65', 'worker-host-42:123456:3', L.NOW, 'TML',
      L.NOW, '')
  end
  L.save_job(jobid, record)
end
return 1
"""


def measure(jobs: int, trail_length: int) -> dict[str, float]:
    server = RedisServer().start()
    try:
        client = server.client()
        keys = Keys("bench")
        script = client.register_script(source_of(WRITE))  # after the library, as every script
        record = encode_job(JobRecord(time.time(), 1, "once", 0, 1234, 5, 0, 1, time.time()))
        events = trail_length + math.ceil(trail_length / 2) - 1  # the most a trail holds
        common = [repr(time.time()), "d", keys.queue_channel(""), trail_length]
        before = client.info("memory")["used_memory"]
        started = time.monotonic()
        for first in range(0, jobs, BATCH):
            script(keys=keys.job_state(), args=[*common, record, first, min(BATCH, jobs - first), events])
        seconds = time.monotonic() - started
        after = client.info("memory")["used_memory"]
        length = len(trail_of(client.hget(keys.jobs, "job0:A")))
        return {"jobs": jobs, "trail_length": trail_length, "events_per_job": length,
                "bytes_per_job": (after - before) / jobs, "megabytes": (after - before) / 2**20,
                "write_seconds": seconds}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trail_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--trail-length", type=int, default=TRAIL_LENGTH)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.jobs, args.trail_length), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
