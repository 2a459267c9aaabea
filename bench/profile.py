"""Where a worker's time per job goes: ``python -m bench.profile [--jobs N] [--seconds S]``.

1. CPU per job of the supervisor, the slot's child (which claims, runs and
   finishes the jobs) and redis-server while ``redbike work`` drains no-op
   jobs (/proc/PID/stat, INFO), split user/system.
2. py-spy (if installed: ``pip install -e '.[bench]'``) on the slot's child,
   GIL-holding samples only: the Python functions that burn its CPU.
3. finish+claim (SlotClaims.finish) alone, in this process, under cProfile.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import shutil
import subprocess
import tempfile
import time

from . import redbike_bench as rb
from .procs import descendants
from .server import RedisServer, snapshot
from .tally import count


def _user_sys(pid: int) -> tuple[float, float]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except OSError:
        return 0.0, 0.0


def cpu_split(server: RedisServer, jobs: int, seconds: float, pyspy: bool) -> None:
    client = server.client()
    client.flushall()
    rb.fill_now(server, jobs)
    ws = rb.Workspace(server)
    try:
        proc = ws.worker("bench.noop:Noop('A')", 1)
        while count(ws.tally) < 500:
            time.sleep(0.01)
        kid = descendants(proc.pid)[-1]  # the zygote comes first, then the slot's child
        pids = {"supervisor": proc.pid, "child": kid, "redis-server": server.pid()}
        before = {name: _user_sys(pid) for name, pid in pids.items()}
        done0, t0 = count(ws.tally), time.monotonic()
        time.sleep(seconds)
        done = count(ws.tally) - done0
        elapsed = time.monotonic() - t0
        after = {name: _user_sys(pid) for name, pid in pids.items()}
        print(f"1. {done:,} jobs in {elapsed:.1f} s: {done / elapsed:,.0f}/s, {elapsed / done * 1e6:.0f} us wall per job")
        for name in pids:
            user = (after[name][0] - before[name][0]) / done * 1e6
            system = (after[name][1] - before[name][1]) / done * 1e6
            print(f"   {name:13s} CPU per job: {user:6.1f} us user + {system:5.1f} us system")
        if pyspy:
            spy = shutil.which("py-spy")
            if not spy or count(ws.tally) > jobs - 1000:
                print("2. py-spy: not installed (pip install -e '.[bench]'), or too few jobs left")
                return
            raw = tempfile.mktemp(suffix=".txt")
            subprocess.run([spy, "record", "--gil", "-r", "250", "-d", str(int(seconds)), "-f", "raw", "-o", raw,
                            "-p", str(kid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            inclusive: collections.Counter[str] = collections.Counter()
            total = 0
            try:
                with open(raw) as handle:
                    for line in handle:
                        stack, _, n = line.rstrip().rpartition(" ")
                        if not stack:
                            continue
                        total += int(n)
                        for frame in {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
                                      for f in stack.split(";")[1:] if " (" in f}:
                            inclusive[frame] += int(n)
            finally:
                if os.path.exists(raw):
                    os.unlink(raw)
            print(f"2. py-spy --gil on the slot's child: {total} samples holding the GIL; inclusive share:")
            for frame, n in inclusive.most_common(30):
                print(f"   {100 * n / max(total, 1):5.1f}%  {frame}")
    finally:
        ws.close()


def pieces(server: RedisServer, n: int) -> None:
    from redbike.claims import Rotation
    from redbike.keys import Keys
    from redbike.states import Outcome
    from redbike.supervisor import WorkerPool

    from .noop import Noop

    client = server.client()
    client.flushall()
    rb.fill_now(server, 3 * n + 2000)
    pool = WorkerPool(client, Keys(rb.PREFIX), Noop("A"))
    rotation, slot = Rotation(pool.queue_names), pool.claims.slot(0, pool.worker_id(0))
    job = slot.claim(rotation).claimed

    def loop(k: int) -> None:
        nonlocal job
        for _ in range(k):
            job = slot.finish(job, Outcome("ok"), "", rotation).claimed

    loop(500)
    before = snapshot(client)
    wall, cpu = time.perf_counter(), time.process_time()
    loop(n)
    wall, cpu = (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6
    after = snapshot(client)
    script = sum(float(after.info.get(name, {}).get("usec", 0)) - float(before.info.get(name, {}).get("usec", 0))
                 for name in ("cmdstat_evalsha", "cmdstat_fcall")) / n
    print(f"3. finish+claim, one script call, in this process: {wall:.1f} us wall, {cpu:.1f} us CPU of this process, "
          f"{script:.1f} us of Redis running the script")
    profiler = cProfile.Profile()
    profiler.enable()
    loop(n)
    profiler.disable()
    print("    cProfile of that loop, by own time:")
    stats = pstats.Stats(profiler)
    stats.sort_stats(os.environ.get("PROFILE_SORT", "tottime")).print_stats(int(os.environ.get("PROFILE_LINES", "15")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-py-spy", action="store_true")
    args = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        cpu_split(server, args.jobs, args.seconds, not args.no_py_spy)
        try:
            pieces(server, 10000)
        except Exception as exc:  # noqa: BLE001 - these use redbike's internals, which may have moved
            print(f"3. n/a: {type(exc).__name__}: {exc}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
