"""`redbike top`: the overview, live, in the terminal (with ``rich``: the
``views`` extra). A summary on top, then one section as a table: queues,
workers, failures or resources; keys switch them, ``q`` quits. Not on a
terminal, it prints `redbike info`'s text once.

The parts that scan every job (counts per status, failures) are read again
only every SCAN_EVERY refreshes' worth of their own cost, so a million jobs
do not make it scan without pause.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from . import info
from .explain import utc

KEYS = {"1": "queues", "u": "queues", "2": "workers", "w": "workers", "3": "failures", "f": "failures",
        "4": "resources", "r": "resources"}
SCAN_EVERY = 10.0  # the scans take at most a tenth of the time, and are at least an interval old

Reader = Callable[[bool], dict[str, Any]]  # scan or not -> the overview


def run_top(read: Reader, interval: float) -> int:
    """Show the overview until ``q`` (or Ctrl-C); not on a terminal (or
    on one that cannot move its cursor: TERM=dumb), once as text."""
    if not (sys.stdout.isatty() and sys.stdin.isatty()) or os.environ.get("TERM") in ("dumb", "unknown"):
        print("\n".join(info.lines(read(True))))
        return 0
    from rich.console import Console
    from rich.live import Live

    console = Console()
    view, shown, error = "queues", None, ""
    scanned_at, scan_cost, scanned = float("-inf"), 0.0, (None, None)
    with _keys() as key, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            started = time.monotonic()
            scan = started - scanned_at >= max(interval, SCAN_EVERY * scan_cost)
            try:
                shown = read(scan)
                error = ""
            except redis.RedisError as exc:
                error = f"Redis error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            if shown is not None:
                if scan and not error:
                    scanned_at, scan_cost = started, time.monotonic() - started
                    scanned = (shown["statuses"], shown["failures"])
                else:
                    shown["statuses"], shown["failures"] = scanned
            live.update(_render(shown, view, error, interval), refresh=True)
            pressed = key(max(0.05, interval - (time.monotonic() - started)))
            while pressed is not None:
                if pressed in ("q", "Q", "\x03"):
                    return 0
                if pressed == "\t":
                    view = info.SECTIONS[(info.SECTIONS.index(view) + 1) % len(info.SECTIONS)]
                view = KEYS.get(pressed, view)
                live.update(_render(shown, view, error, interval), refresh=True)
                pressed = key(max(0.0, interval - (time.monotonic() - started)))


@contextmanager
def _keys() -> Iterator[Callable[[float], str | None]]:
    """A function waiting up to some seconds for one key press (None: none),
    with the terminal in cbreak mode (keys come one by one, unechoed) meanwhile."""
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def key(seconds: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], seconds)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        yield key
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _render(shown: dict[str, Any] | None, view: str, error: str, interval: float) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    if shown is None:
        parts.append(Text(error or "reading..."))
    else:
        busy = sum(1 for w in shown["workers"] for s in w.get("running", []) if s.get("jobid") is not None)
        slots = sum(int(w.get("slots") or 0) for w in shown["workers"])
        parts.append(Text(f"redbike top ({info.where(shown)}) at {utc(shown['at'])}", style="bold"))
        parts.append(Text(info.redis_line(shown)))
        parts.append(Text(f"Dispatchers: {len(shown['dispatchers'])}"))
        parts += [Text(line) for line in info.dispatcher_lines(shown)]
        parts.append(Text(f"Workers: {len(shown['workers'])} pool(s), {slots} slot(s), {busy} busy;  "
                          f"queues: {len(shown['queues'])};  statuses: {info.status_line(shown)}"))
        if error:
            parts.append(Text(error, style="bold red"))
        header, rows, title = {
            "queues": (info.QUEUE_HEADER, info.queue_rows(shown), "Queues"),
            "workers": (info.WORKER_HEADER, info.worker_rows(shown), "Workers and their slots"),
            "failures": (info.FAILURE_HEADER, info.failure_rows(shown), info.failures_title(shown)),
            "resources": (info.RESOURCE_HEADER, info.resource_rows(shown), "Resources at or near capacity"),
        }[view]
        grid = Table(*header, title=title, title_justify="left", expand=True)
        for row in rows:
            grid.add_row(*row)
        parts.append(grid)
    tabs = "  ".join(f"[{n}] {name}" for n, name in enumerate(info.SECTIONS, 1))
    parts.append(Text(f"{tabs}  (Tab: next)   q: quit   every {interval:g} s", style="reverse"))
    return Group(*parts)
