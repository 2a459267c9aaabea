"""redbike: a cron-style job dispatcher and worker pool on Redis.

Usage:
  redbike [options] set JOBID SCHEDULE [--after=TS] [--needs=NEEDS] [--misfire=POLICY] [--grace=S] [--retries=N]
                    [--data=JSON | --data-file=PATH]
  redbike [options] unset JOBID
  redbike [options] retry (--status=DIE | JOBID...)
  redbike [options] dispatch [WORKER] [--schedules=CSV [--after=TS]] [--nodes]
  redbike [options] work [WORKER] [--concurrency=N] [--resources=AMOUNTS]
  redbike [options] statuses [--before=TS]
  redbike [options] schedules
  redbike [options] tell JOBID
  redbike [options] preview JOBID [--count=N] [--after=TS] [--json]
  redbike [options] preview --schedule=SCHEDULE [--count=N] [--after=TS] [--json]
  redbike [options] explain JOBID [--json]
  redbike [options] capacity RESOURCE CAPACITY
  redbike [options] capacity --load=CSV
  redbike [options] capacities
  redbike [options] (pause | resume) QUEUE
  redbike [options] nodes [--level=L]
  redbike [options] nodes --reconcile [NODESCONF] [--loop | --whole]
  redbike [options] node NAME
  redbike [options] feed FUNCTION [ARG...] [--queue=Q] [--high-water=N] [--batch=N] [--name=FEED] [--wait]
  redbike [options] feed --source=URL [--queue=Q] [--name=FEED] [--every=S] [--once]
  redbike [options] feeds
  redbike [options] info [--json]
  redbike [options] top [--interval=S]
  redbike [options] scale [--target=T] [--window=S] [--json]
  redbike [options] serve [WORKER] [--bind=ADDR] [--token=T]
  redbike [options] control HALT
  redbike [options] demo [--seconds=S]
  redbike [options] embedded (status | stop)
  redbike (-h | --help | --version)

Options:
  --config=CONF      Config file [default: .redbike.conf, if present].
  --after=TS         Count runs from this time (epoch seconds or ISO 8601)
                     instead of the timefile's (preview: instead of now).
  --before=TS        Only jobs whose last status is older than this.
  --schedules=CSV    Set these JOBID,SCHEDULE[,NEEDS[,MISFIRE[,RETRIES[,DATA]]]] rows
                     before dispatching.
  --needs=NEEDS      Resources the job needs: host:db-17,db:db42=2 (amount 1
                     unless given); none: it needs nothing. Without it a job
                     keeps its needs.
  --misfire=POLICY   What runs of the occurrences missed while the job could
                     not run: once (one run for all), skip (those later than
                     the grace are skipped), all or all:N (each, oldest
                     first; at most the N latest). Without it a job keeps
                     its policy; a new one gets the config's misfire.
  --grace=S          Seconds late an occurrence may still run under skip.
  --retries=N        Runs after the first when a run raises or does not
                     complete, with exponential backoff (config retries).
  --data=JSON        The job's payload, a JSON value (work() gets it as
                     self.data; null drops it). Without it a job keeps its
                     payload.
  --data-file=PATH   The payload read from a file of JSON (- : stdin).
  --status=DIE       retry: every failed job.
  --concurrency=N    Worker processes under this supervisor, 1 to 256
                     (each maps 2 MiB of shared memory) [default: 1].
  --resources=AMOUNTS  This pool's worker-local resources: cpu_cores=16,ram_gb=64
                     (jobs need them as worker:cpu_cores=4).
  --load=CSV         Set the RESOURCE,CAPACITY rows of a CSV file.
  --seconds=S        How long the demo runs [default: 5].
  --schedule=SCHEDULE  Preview this schedule (no Redis needed).
  --count=N          How many occurrences preview shows, 1 to 1000 [default: 10].
  --level=L          nodes: only the nodes of level L.
  --reconcile        nodes: poll the node sources of the [redbike-nodes]
                     section (of NODESCONF, else of the config file) and
                     bring the tasks in step with the nodes, once.
  --nodes            dispatch: also reconcile the node model of the
                     [redbike-nodes] section, in a thread, while this
                     dispatcher leads.
  --loop             With --reconcile: go on, polling each source on its
                     interval, until SIGTERM/SIGINT (one reconciler leads).
  --whole            With --reconcile: compare every task and capacity, not
                     only those of the nodes changed since the last pass.
  --json             JSON for tools: preview, a list (notes go to stderr);
                     explain, info and scale, one object.
  --interval=S       top: seconds between refreshes [default: 2].
  --queue=Q          feed: the queue of its jobs (each job id gets ':Q').
  --high-water=N     feed: most of its jobs outstanding (queued, running or
                     waiting for a retry) [default: 10000].
  --batch=N          feed: items put in per transaction (at most half the
                     high-water mark) [default: 500].
  --name=FEED        feed: its name (checkpoint, lease) [default: the
                     function's module.name].
  --source=URL       feed: poll this work-queue source (GET URL: an ItemList
                     v1 of item names; GET URL/NAME: an Item v1 whose data
                     is the job's payload) instead of calling a function.
  --every=S          feed --source: seconds between polls, 0.1 to 86400
                     [default: 10].
  --once             feed --source: poll once, then exit.
  --wait             feed: exit once its jobs have ended too (exit 1 if any
                     failed).
  --target=T         scale: the utilisation to size the slots for, above 0
                     and at most 1 [default: 0.9].
  --window=S         scale: seconds of history the arrival rates and
                     service times are taken over, 60 to 86400 [default: 600].
  --bind=ADDR        serve: listen on HOST:PORT [default: 127.0.0.1:8787].
  --token=T          serve: the token write endpoints require (else the
                     config's api-token; with neither, read-only).
  -v --verbose       Log debug messages.

Exit status: 0 success, 1 runtime failure (e.g. Redis unreachable) or, for
`embedded status`, no embedded server running, 2 bad input (usage, schedule,
config, worker spec, CSV), 3 no such job (or node).

With no [redbike-redis] in the config, commands use the embedded Redis server
of the nearest .redbike/ folder here or above (as git finds .git/), or start
one in ./.redbike/ (with a warning) if there is none.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import redis
from docopt import DocoptExit, docopt

from . import clifeed, cliviews
from .api import JobIdError, Redbike
from .clients import check_reachable
from .config import DEFAULT_PATH, Config, ConfigError, load_config
from .csvfile import CsvError
from .embedded import EmbeddedError, find_folder, server_status, stop_server
from .feed import FeedBusy, SourceFailed
from .jobinput import parse_retries
from .names import check_jobid, whole_number
from .nodeconfig import NodeConfig, load_node_config
from .nodeloop import ConfigWatch, reconcile_loop
from .nodes import check_node_name
from .occurrences import misfire_text
from .preview import parse_count, preview
from .reconcile import Busy
from .records import decode_data, parse_data
from .registry import redbike_version
from .resources import ResourceError, check_name, parse_capacity
from .roundrobin import RoundRobin
from .schedules import ScheduleError, parse_schedule, parse_timestamp
from .sharded import NotOverShards, ShardedRedbike
from .shards import Shards
from .workerspec import WorkerSpecError, load_worker

log = logging.getLogger("redbike")

# Each slot maps 2 MiB of shared memory and forks a process: a typo such as
# --concurrency=99999999999999999999 must be refused, not attempted.
MAX_CONCURRENCY = 256

BAD_INPUT = (ConfigError, WorkerSpecError, ScheduleError, CsvError, JobIdError, ResourceError, EmbeddedError, ValueError)


class NoSuchJob(Exception):
    pass


class Unreachable(Exception):
    """Redis cannot be reached: a runtime failure (exit 1), not bad input."""


def _setup_logging(verbose: bool, daemon: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO if daemon else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _timestamp(value: str | None) -> float | None:
    return None if value is None else parse_timestamp(value)


def _worker(spec: str | None, config: Config, required: bool) -> RoundRobin:
    spec = spec or config.worker
    if spec:
        return load_worker(spec)
    if required:
        raise ConfigError("no worker: give WORKER (e.g. mymodule:Worker('A:B')) or set 'worker' in [redbike]")
    return RoundRobin()


def _concurrency(text: str) -> int:
    return whole_number(text, "--concurrency", 1, MAX_CONCURRENCY, " (each slot maps 2 MiB of shared memory)")


def _check_usage(args: dict[str, Any]) -> None:
    """Command-line checks that need no Redis: done before connecting."""
    if args["control"] and args["HALT"] != "HALT":
        raise ValueError(f"unknown control command {args['HALT']!r}; the only one is HALT")
    if args["work"]:
        _concurrency(args["--concurrency"])
    if args["set"]:
        _policy(args)
    if args["retry"] and args["--status"] is not None and args["--status"] != "DIE":
        raise ValueError(f"retry --status takes DIE (the failed jobs), not {args['--status']!r}")
    if args["preview"]:
        parse_count(args["--count"])
        _timestamp(args["--after"])
        if args["--schedule"] is not None:
            parse_schedule(args["--schedule"])
        else:
            check_jobid(args["JOBID"])
    if args["nodes"] and args["--level"] is not None:
        check_node_name(args["--level"], "level")
    if args["node"]:
        check_node_name(args["NAME"])
    clifeed.check_usage(args)
    cliviews.check_usage(args)


def _node_config(args: dict[str, Any]) -> NodeConfig:
    """The [redbike-nodes] section of NODESCONF, else of the config file."""
    path = args["NODESCONF"] or args["--config"] or DEFAULT_PATH
    config = load_node_config(path)
    if config is None:
        raise ConfigError(f"no [redbike-nodes] section in {path!r}")
    return config


def _reconcile(args: dict[str, Any], bike: Redbike, config: NodeConfig) -> int:
    """`nodes --reconcile [--loop]`: once (a summary on stderr), or until a signal."""
    if not args["--loop"]:
        done = bike.reconcile_nodes(config, whole=bool(args["--whole"]))
        print(f"reconciled ({'whole pass' if done.whole else 'changed nodes only'}): {done.summary()}",
              file=sys.stderr)
        for error in done.errors:
            print(f"redbike: {error}", file=sys.stderr)
        return 1 if done.errors else 0
    stopping: list[int] = []

    def stop(signum: int, _frame: object) -> None:  # only sets a flag
        stopping.append(signum)

    watch = ConfigWatch(config)  # its files changed, or SIGHUP: read again
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, watch.hup)
    reconcile_loop(bike, config, stop=lambda: bool(stopping), reload=watch)
    return 0


def _policy(args: dict[str, Any]) -> dict[str, Any]:
    """set's --misfire, --grace and --retries, checked."""
    grace = None
    if args["--grace"] is not None:
        try:
            grace = float(args["--grace"])
        except ValueError:
            grace = math.nan
        if not (math.isfinite(grace) and 0 <= grace <= 10 * 365 * 86400):
            raise ValueError(f"--grace must be a number of seconds from 0, not {args['--grace']!r}")
    misfire = args["--misfire"]
    if misfire is not None:
        misfire_text(misfire.strip().lower(), grace)
    retries = parse_retries(args["--retries"]) if args["--retries"] is not None else None
    return {"misfire": misfire, "grace": grace, "retries": retries}


def _data(args: dict[str, Any], config: Config) -> dict[str, Any]:
    """set's --data or --data-file, checked (JSON, at most max-data-bytes)."""
    text = args["--data"]
    if args["--data-file"] is not None:
        path = args["--data-file"]
        try:
            if path == "-":
                text = sys.stdin.read()
            else:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --data-file {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if text is None:
        return {}
    return {"data": decode_data(parse_data(text, config.max_data_bytes))}


def _bike(args: dict[str, Any], config: Config, worker_required: bool = False) -> Redbike | ShardedRedbike:
    worker = _worker(args["WORKER"], config, worker_required)
    shards = Shards.connect(config.redis, config.prefix, config.shards)
    try:
        for client in dict.fromkeys(shards.clients):  # each distinct client once
            check_reachable(client)
    except ConfigError as exc:
        raise Unreachable(str(exc)) from None
    options: dict[str, Any] = {"default_timeout": config.default_timeout, "misfire": config.misfire,
                               "retries": config.retries, "retry": config.retry, "retention": config.retention,
                               "max_data_bytes": config.max_data_bytes}
    if shards.count > 1:
        return ShardedRedbike(worker, shards, timefile=config.timefile, **options)
    return Redbike(worker, prefix=config.prefix, timefile=config.timefile, client=shards.clients[0], **options)


def _embedded(stop: bool) -> int:
    """`embedded stop` / `embedded status` for the .redbike/ folder found here
    or above; status exits 1 when no server runs."""
    folder = find_folder()
    where = folder or "no .redbike/ folder here or above"
    if stop:
        print(f"stopped the embedded Redis server in {folder}" if folder and stop_server(folder) else f"not running ({where})")
        return 0
    status = server_status(folder) if folder else None
    if status is None:
        print(f"not running ({where})")
        return 1
    unknown = "unknown (the server is loading its data)" if status.busy else "unknown"
    uptime = status.uptime_seconds
    print("running")
    for name, value in (
        ("folder", status.folder),
        ("socket", status.socket),
        ("pid", status.pid),
        ("version", status.version),
        ("uptime", None if uptime is None else f"{uptime} s ({datetime.timedelta(seconds=uptime)})"),
        ("memory", status.used_memory),
    ):
        print(f"{name + ':':<9}{unknown if value is None else value}")
    return 0


def _preview(args: dict[str, Any], text: str, now: float, jobid: str | None = None) -> int:
    """Print the next occurrences of a schedule after --after, else ``now``."""
    try:
        schedule = parse_schedule(text)
    except ScheduleError as exc:  # a job recorded BAD keeps the text it was given
        raise ScheduleError(f"{jobid} has a {exc}" if jobid else str(exc)) from None
    after = _timestamp(args["--after"])
    shown = preview(schedule, now if after is None else after, parse_count(args["--count"]))
    if args["--json"]:
        print(shown.json())
        for note in shown.notes:
            print(f"redbike: {note}", file=sys.stderr)
    else:
        print("\n".join(shown.lines()))
    return 0


def _run(args: dict[str, Any]) -> int:
    _check_usage(args)
    config = load_config(args["--config"])
    if args["embedded"]:
        return _embedded(stop=bool(args["stop"]))
    if args["demo"]:
        from .demo import run_demo

        return run_demo(config, seconds=float(args["--seconds"]))
    if args["preview"] and args["--schedule"] is not None:
        return _preview(args, args["--schedule"], time.time())
    # Read before Redis is contacted: a mistake is bad input (exit 2).
    reconciles = (args["nodes"] and args["--reconcile"]) or (args["dispatch"] and args["--nodes"])
    node_config = _node_config(args) if reconciles else NodeConfig()
    payload = _data(args, config) if args["set"] else {}
    bike = _bike(args, config, worker_required=bool(args["work"]))
    out = csv.writer(sys.stdout, lineterminator="\n")
    if args["set"]:
        result = bike.set(args["JOBID"], args["SCHEDULE"], after=_timestamp(args["--after"]), needs=args["--needs"],
                          **_policy(args), **payload)
        if result == "PENDING":
            print(f"{args['JOBID']} is running; its new schedule applies when the run ends", file=sys.stderr)
        elif result == "KEPT":
            print(f"{args['JOBID']} already has this schedule, whose time has passed; left as it is", file=sys.stderr)
    elif args["unset"]:
        if bike.unset(args["JOBID"]) == 0:
            raise NoSuchJob(f"no such job: {args['JOBID']}")
    elif args["retry"]:
        results = bike.retry(args["JOBIDS"], status=args["--status"])
        unknown = [jobid for jobid, result in results.items() if result == "NO SUCH JOB"]
        for jobid, result in results.items():
            if result == "NOT FAILED":
                print(f"{jobid} has not failed; left as it is", file=sys.stderr)
        if unknown:  # the others were put back, as it says
            raise NoSuchJob(f"no such job: {', '.join(unknown)}")
        print(f"{sum(result == 'PLACED' for result in results.values())} job(s) put back", file=sys.stderr)
    elif args["dispatch"]:
        bike.dispatch(args["--schedules"], after=_timestamp(args["--after"]), nodes=node_config if args["--nodes"] else None)
    elif args["work"]:
        bike.work(concurrency=_concurrency(args["--concurrency"]), resources=args["--resources"])
    elif args["statuses"]:
        out.writerows(bike.statuses(before=_timestamp(args["--before"])))
    elif args["schedules"]:
        out.writerows(bike.schedules())
    elif args["tell"]:
        told = bike.tell(args["JOBID"])
        if told is None:
            raise NoSuchJob(f"no such job: {args['JOBID']}")
        print(json.dumps(told, indent=2))
    elif args["preview"]:
        schedule = bike.schedule_of(args["JOBID"])
        if schedule is None:
            raise NoSuchJob(f"no such job: {args['JOBID']}")
        return _preview(args, schedule, bike.clock(), jobid=args["JOBID"])
    elif args["explain"]:
        explained = bike.explain(args["JOBID"])
        if explained is None:
            raise NoSuchJob(f"no such job: {args['JOBID']}")
        if args["--json"]:
            print(json.dumps(explained.as_json(), indent=2))
        else:
            print("\n".join(explained.lines()))
    elif args["capacity"]:
        if args["--load"]:
            print(f"{bike.load_capacities(args['--load'])} capacities set", file=sys.stderr)
        else:
            bike.set_capacity(check_name(args["RESOURCE"]), parse_capacity(args["CAPACITY"]))
    elif args["pause"] or args["resume"]:
        queue = args["QUEUE"]
        changed = bike.pause(queue) if args["pause"] else bike.resume(queue)
        if not changed:
            print(f"{queue} was already {'paused' if args['pause'] else 'not paused'}", file=sys.stderr)
    elif args["capacities"]:
        for resource, capacity, in_use, waiting in bike.capacities():
            out.writerow((resource, "" if capacity is None else capacity, in_use, waiting))
    elif args["nodes"] and args["--reconcile"]:
        if isinstance(bike, ShardedRedbike):
            raise NotOverShards("the node model is not yet supported with shards > 1")
        return _reconcile(args, bike, node_config)
    elif args["nodes"]:
        out.writerows(bike.nodes(level=args["--level"]))
    elif args["node"]:
        shown = bike.node(args["NAME"])
        if shown is None:
            raise NoSuchJob(f"no such node: {args['NAME']}")
        print(json.dumps(shown, indent=2))
    elif args["feed"] or args["feeds"]:
        return clifeed.run(args, bike)
    elif args["info"] or args["top"] or args["scale"] or args["serve"]:
        return cliviews.run(args, bike, config)
    elif args["control"]:
        bike.control("HALT")
    return 0


def _flushed(code: int) -> int:
    """Flush stdout here, so that a reader gone (`redbike schedules | head -1`) is
    quietly ignored; stdout then goes to /dev/null: the flush at exit cannot fail."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        args = docopt(__doc__, argv=argv, version=f"redbike {redbike_version()}")
    except BrokenPipeError:
        return _flushed(0)
    except DocoptExit:
        words = " ".join(sys.argv[1:] if argv is None else argv)
        print(f"redbike: bad command line {words!r}; see 'redbike --help'", file=sys.stderr)
        return 2
    except SystemExit:  # after --help or --version
        return _flushed(0)
    if args["--config"] == ".redbike.conf, if present":
        args["--config"] = None
    # JOBID is a list (retry takes several); every other command takes one.
    args["JOBIDS"] = args["JOBID"]
    args["JOBID"] = args["JOBID"][0] if args["JOBID"] else None
    _setup_logging(args["--verbose"], daemon=bool(args["dispatch"] or args["work"] or args["demo"]
                                                                 or args["--reconcile"] or args["serve"]
                                                                 or args["feed"]))
    try:
        return _flushed(_run(args))
    except NoSuchJob as exc:
        print(f"redbike: {exc}", file=sys.stderr)
        return 3
    except (Unreachable, Busy, cliviews.MissingExtra, SourceFailed, FeedBusy) as exc:
        print(f"redbike: {exc}", file=sys.stderr)
        return 1
    except BAD_INPUT as exc:
        print(f"redbike: {exc}", file=sys.stderr)
        return 2
    except redis.RedisError as exc:
        print(f"redbike: Redis error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _flushed(0)


if __name__ == "__main__":
    sys.exit(main())
