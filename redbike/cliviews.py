"""The commands that watch redbike, for cli.py: `info`, `top`, `scale` and
`serve` (top and serve need optional extras: rich, the web stack)."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

from . import info, overviews, scale
from .api import Redbike
from .config import Config
from .names import seconds_between, whole_number

if TYPE_CHECKING:
    from .sharded import ShardedRedbike


class MissingExtra(Exception):
    """An optional dependency is not installed (exit 1)."""


def check_usage(args: dict[str, Any]) -> None:
    """What can be checked of these commands' options before Redis is contacted."""
    if args["top"]:
        _interval(args["--interval"])
    if args["scale"]:
        _target(args["--target"])
        whole_number(args["--window"], "--window", 60, 86400)
    if args["serve"]:
        _web().parse_bind(args["--bind"])


def run(args: dict[str, Any], bike: Redbike | ShardedRedbike, config: Config) -> int:
    """`info`, `top`, `scale` or `serve` (over every shard); the exit status."""
    if args["top"]:
        return _top(bike, _interval(args["--interval"]))
    if args["serve"]:
        return int(_web().serve(bike, args["--bind"], args["--token"] or config.api_token))
    if args["scale"]:
        shown = scale.advice_over(overviews.parts_of(bike), bike.clock(), target=_target(args["--target"]),
                                  window=whole_number(args["--window"], "--window", 60, 86400))
        print(json.dumps(shown, indent=2) if args["--json"] else "\n".join(scale.lines(shown)))
        return 0
    shown = bike.overview()
    print(json.dumps(shown, indent=2) if args["--json"] else "\n".join(info.lines(shown)))
    return 0


def _target(text: str) -> float:
    try:
        target = float(text)
    except ValueError:
        target = math.nan
    if not 0 < target <= 1:
        raise ValueError(f"--target must be a utilisation above 0 and at most 1, not {text!r}")
    return target


def _web() -> Any:
    """redbike.web.serve (the web extra), or MissingExtra."""
    try:
        from .web import serve
    except ImportError as exc:
        raise MissingExtra(f"serve needs the web extra ({(exc.name or '?').split('.')[0]} is missing): pip install 'redbike[web]'") from None
    return serve


def _interval(text: str) -> float:
    return seconds_between(text, "--interval", 0.1, 3600)


def _top(bike: Redbike | ShardedRedbike, interval: float) -> int:
    """`top`: live on a terminal (rich, the views extra), else `info`'s text."""
    try:
        from .top import run_top
        if sys.stdout.isatty():
            import rich  # noqa: F401 - only checked for
    except ImportError:
        raise MissingExtra("top needs rich: pip install 'redbike[views]'") from None
    return run_top(bike.overview, interval)
