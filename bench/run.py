"""Run the redbike benchmark suite: ``python -m bench`` (see bench/README.md).

Starts its own redis-server on a free loopback port, measures, prints the
results table and writes results.md, results.json and scaling.png to --out
(default bench/results/latest/, not committed); --commit-results writes them
to bench/results/, the committed run that bench/README.md describes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import redbike_bench as rb
from . import report
from .load import OtherLoad, wait_quiet
from .server import RedisServer, calibrate

SECTIONS = ("limit", "drain", "scale", "latency", "pickup", "idle", "heartbeats", "gating", "peers")
COMMITTED_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_OUT = os.path.join(COMMITTED_OUT, "latest")  # git-ignored: a run does not overwrite the committed one
# Recorded with every run: the peers' figures depend on their releases.
PACKAGES = ("redis", "hiredis", "rq", "huey", "celery", "kombu", "dramatiq", "arq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, a few seconds, no peers (what tests/test_bench_smoke.py runs)")
    parser.add_argument("--jobs", type=int, default=20000,
                        help="no-op jobs drained by redbike and by each peer (default 20000)")
    parser.add_argument("--sizes", default="10000,100000",
                        help="jobs due at once for dispatch and memory, comma-separated (default 10000,100000)")
    parser.add_argument("--million", action="store_true", help="add 1,000,000 to --sizes")
    parser.add_argument("--work-window", type=float, default=20.0,
                        help="seconds the worker drains at each size, for its RSS (default 20)")
    parser.add_argument("--latency-rate", type=float, default=500.0, help="jobs/s falling due (default 500)")
    parser.add_argument("--latency-seconds", type=float, default=20.0, help="for this long (default 20)")
    parser.add_argument("--latency-workers", type=int, default=2, help="idle worker processes (default 2)")
    parser.add_argument("--pickups", type=int, default=100, help="NOW jobs given to an idle worker (default 100)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="window for idle commands/s, per process (default 10)")
    parser.add_argument("--long-job", type=float, default=7.0,
                        help="seconds of the one job run to see heartbeats (shorter than its 12 s lease; 0: none)")
    parser.add_argument("--peers", default="all",
                        help="all, none, or a comma-separated list of: rq-simple,rq-fork,huey,celery-solo,dramatiq,arq")
    parser.add_argument("--peer-window", type=float, default=30.0,
                        help="at most this many seconds timing each peer's drain (default 30)")
    parser.add_argument("--skip", default="", help=f"sections to leave out, comma-separated: {','.join(SECTIONS)}")
    parser.add_argument("--only", default="", help="run only these sections, comma-separated")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=DEFAULT_OUT,
                       help="folder for results.md/.json and scaling.png (default bench/results/latest, git-ignored)")
    where.add_argument("--commit-results", dest="out", action="store_const", const=COMMITTED_OUT,
                       help="write them to bench/results/, replacing the committed run")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long until other processes leave the CPU alone (default 0)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.jobs = min(args.jobs, 300)
        args.sizes = "500,2000"
        args.million = False
        args.work_window = 3.0
        args.latency_rate, args.latency_seconds = 100.0, 1.0
        args.pickups = 5
        args.idle_seconds = 1.0
        args.long_job = 0.0
        if args.peers == "all":
            args.peers = "none"
    return args


def machine(server: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import redis

    try:
        import hiredis  # noqa: F401

        has_hiredis = True
    except ImportError:
        has_hiredis = False

    info = server.client().info("server")
    options = {k: v for k, v in vars(args).items() if k not in ("out", "no_plot", "wait_quiet")}
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
        "redis_py": redis.__version__, "hiredis": has_hiredis, "redis": info["redis_version"],
        "redis_malloc": "malloc=" + str(server.client().info("memory").get("mem_allocator", "?")),
        "redbike": _redbike_version(), "platform": platform.platform(), "packages": _package_versions(),
        "options": " ".join(f"--{k.replace('_', '-')}={v}" for k, v in options.items()),
    }


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _redbike_version() -> str:
    import subprocess

    import redbike

    folder = os.path.dirname(os.path.dirname(os.path.abspath(redbike.__file__)))
    try:
        head = subprocess.run(["git", "-C", folder, "describe", "--always", "--dirty"], check=False, capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return head or folder


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every selected section; a section that fails is recorded under
    results['errors'] and the others go on."""
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    wanted = [s for s in SECTIONS if s not in skip and (not only or s in only)]
    if args.peers == "none" and "peers" in wanted:
        wanted.remove("peers")
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()} | ({1_000_000} if args.million else set()))
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet, say)
    rb.PROBE_SECONDS = 0.1 if args.smoke else 0.5
    server = RedisServer().start()
    results: dict[str, Any] = {"errors": {}, "other_load": {}}
    started = time.monotonic()
    try:
        results["machine"] = machine(server, args)
        calibrate(server.client())
        rb.check_layout(server)

        def section(name: str, what: str, fn: Callable[[], Any]) -> None:
            if name not in wanted:
                return
            say(f"[{time.monotonic() - started:6.1f}s] {what} ...")
            load = OtherLoad([server.pid()])
            load.start()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - recorded; the other sections go on
                results["errors"][name] = f"{type(exc).__name__}: {exc}"
                say(f"  FAILED: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            other = load.stop()
            results["other_load"][name] = other
            if other["cores"] >= 0.1 or other["steal"] >= 0.1:
                say(f"  WARNING: other processes used {other['cores']:.2f} cores meanwhile"
                    f" (steal {other['steal']:.2f}): {'; '.join(other['top'])}")

        def limit() -> None:
            results["limit"] = rb.limit(server, 0.3 if args.smoke else 2.0)

        def drain() -> None:
            results["drain"] = {f"c{c}": rb.drain(server, args.jobs, c) for c in (1, 2)}

        def scale() -> None:
            results["scale"] = []
            for n in sizes:
                say(f"    {n:,} jobs")
                results["scale"].append(rb.dispatch_and_work(server, n, args.work_window))

        def latency() -> None:
            results["latency"] = rb.due_to_start(server, args.latency_rate, args.latency_seconds, args.latency_workers)

        def pickup() -> None:
            results["pickup"] = rb.pickup(server, args.pickups)

        def idle() -> None:
            results["idle"] = rb.idle(server, args.idle_seconds, settle=0.3 if args.smoke else 1.0)

        def heartbeats() -> None:
            results["heartbeats"] = rb.heartbeats(server, args.long_job, short=0.05 if args.smoke else 0.5)

        def gating() -> None:
            from .claim_cost import measure

            parked = (10, 100) if args.smoke else (10, 1_000, 100_000)
            results["gating"] = [measure(server.client(), n, 100 if args.smoke else 1000) for n in parked]

        def peers() -> None:
            from .peers import by_name, run_peer

            results["peers"] = {}
            for peer in by_name(args.peers):
                say(f"    {peer.name}")
                results["peers"][peer.name] = outcome = run_peer(server, peer, args.jobs, args.peer_window,
                                                                 args.idle_seconds)
                if "error" in outcome:
                    say(f"      {peer.name}: {outcome['error'].splitlines()[0][:200]}")

        section("limit", "the limit: PING round trips of one client", limit)
        section("drain", f"worker drain: {args.jobs:,} no-op jobs, concurrency 1 and 2", drain)
        section("scale", f"dispatch and memory at {', '.join(f'{n:,}' for n in sizes)} jobs", scale)
        section("latency", f"due-to-start latency: {args.latency_rate:g} jobs/s for {args.latency_seconds:g} s", latency)
        section("pickup", f"pick-up latency: {args.pickups} NOW jobs", pickup)
        section("idle", f"idle cost: {args.idle_seconds:g} s each", idle)
        section("heartbeats", "heartbeat traffic", heartbeats)
        section("gating", "resource gating: claim cost with jobs parked on a saturated resource", gating)
        section("peers", f"peers: {args.peers}", peers)
    finally:
        server.stop()
    results["seconds"] = time.monotonic() - started
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    text = report.as_text(results)
    print()
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as handle:
        handle.write(report.as_markdown(results) + "\n")
    report.write_json(results, os.path.join(args.out, "results.json"))
    written = [os.path.join(args.out, name) for name in ("results.md", "results.json")]
    if not args.no_plot:
        png = report.plot(results, os.path.join(args.out, "scaling.png"))
        if png:
            written.append(png)
        else:
            print("no plot: matplotlib is not installed (pip install -e '.[bench]')")
    print(f"total {results['seconds']:.0f} s; wrote {', '.join(written)}")
    if results["errors"]:
        print(f"sections that failed: {', '.join(results['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
