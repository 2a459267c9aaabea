"""The feed commands, for cli.py: `feed FUNCTION` (feed.py), `feed
--source=URL` (httpsource.py) and `feeds`."""

from __future__ import annotations

import csv
import sys
from typing import Any

from .api import Redbike
from .feed import run_feed
from .feeditems import parse_arguments
from .feedshards import feed_parts
from .feedview import feeds_over
from .httpsource import run_http_source
from .names import check_feed_name, check_queue, seconds_between, whole_number
from .sharded import NotOverShards, ShardedRedbike
from .workerspec import parse_spec


def check_usage(args: dict[str, Any]) -> None:
    """What can be checked of the feed commands' options before Redis is contacted."""
    if args["feed"] and args["--source"]:
        _every(args["--every"])
        if not args["--source"].startswith(("http://", "https://")):
            raise ValueError(f"--source must be an http:// or https:// URL, not {args['--source']!r}")
        if args["--name"] is not None:
            check_feed_name(args["--name"])
        if args["--queue"] is not None:
            check_queue(args["--queue"])
    elif args["feed"]:
        _feed_options(args)


def run(args: dict[str, Any], bike: Redbike | ShardedRedbike) -> int:
    """`feed` or `feeds`; the exit status."""
    if args["feeds"]:
        parts = [(part.client, part.keys) for part in feed_parts(bike)]
        csv.writer(sys.stdout, lineterminator="\n").writerows(feeds_over(parts))
        return 0
    if args["--source"]:
        if isinstance(bike, ShardedRedbike):
            raise NotOverShards("feed --source is not yet supported with shards > 1 (feed FUNCTION is)")
        return run_http_source(bike, args["--source"], name=args["--name"], queue=args["--queue"],
                               every=_every(args["--every"]), once=bool(args["--once"]))
    return run_feed(bike, args["FUNCTION"], args["ARG"], **_feed_options(args))


def _every(text: str) -> float:
    return seconds_between(text, "--every", 0.1, 86400)


def _feed_options(args: dict[str, Any]) -> dict[str, Any]:
    """feed's options, checked (no Redis needed)."""
    parse_arguments(args["ARG"])
    parse_spec(args["FUNCTION"])
    if args["--name"] is not None:
        check_feed_name(args["--name"])
    if args["--queue"] is not None:
        check_queue(args["--queue"])
    return {"name": args["--name"], "queue": args["--queue"], "wait": bool(args["--wait"]),
            "high_water": whole_number(args["--high-water"], "--high-water", 1, 10**9),
            "batch": whole_number(args["--batch"], "--batch", 1, 100_000)}
