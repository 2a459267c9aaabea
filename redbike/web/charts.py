"""The web UI's charts: per-minute counts (stats.per_minute) as bars whose
geometry is computed here and drawn as inline SVG by the template (numbers
only reach the SVG; labels go through the template's escaping). No
JavaScript, nothing fetched from elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

WIDTH, HEIGHT = 720, 180  # the plot area, SVG user units
LEFT, BOTTOM, TOP = 40, 24, 10  # margins: the y axis labels, the x axis labels, above the highest bar


class Counts(Protocol):
    """What a chart reads of stats.QueueTotals."""

    @property
    def done(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def retried(self) -> int: ...
    @property
    def expired(self) -> int: ...


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: str  # the CSS class: its colour
    value: int
    minute: int  # epoch seconds of the minute's start


@dataclass(frozen=True)
class Tick:
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    title: str
    series: tuple[tuple[str, str], ...]  # (CSS class, legend) of each stacked series, bottom first
    bars: tuple[Bar, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    total: dict[str, int]  # each series' sum over the chart
    width: int = WIDTH + LEFT
    height: int = HEIGHT + BOTTOM + TOP


def totals_of(minutes: Iterable[tuple[int, Mapping[str, Counts]]], queue: str = ""
              ) -> list[tuple[int, dict[str, int]]]:
    """Each minute's counts summed over the queues (or of ``queue`` alone)."""
    summed = []
    for minute, per_queue in minutes:
        counts = {"done": 0, "failed": 0, "retried": 0, "expired": 0}
        for name, totals in per_queue.items():
            if queue and name != queue:
                continue
            for key in counts:
                counts[key] += int(getattr(totals, key))
        summed.append((minute, counts))
    return summed


def stacked(title: str, minutes: Sequence[tuple[int, dict[str, int]]], series: tuple[tuple[str, str], ...],
            label: str = "%H:%M") -> Chart:
    """A bar per minute, its ``series`` (keys of the counts) stacked."""
    peak = max([sum(counts[s] for s, _ in series) for _, counts in minutes] + [0])
    top = _nice(peak)
    step = WIDTH / max(len(minutes), 1)
    bars: list[Bar] = []
    for i, (minute, counts) in enumerate(minutes):
        base = 0
        for name, _ in series:
            value = counts[name]
            if value:
                height = HEIGHT * value / top
                y = TOP + HEIGHT - HEIGHT * base / top - height
                bars.append(Bar(LEFT + i * step + step * 0.1, y, step * 0.8, height, name, value, minute))
            base += value
    y_ticks = tuple(Tick(LEFT - 4, TOP + HEIGHT - HEIGHT * v / top, str(v)) for v in (0, top // 2, top))
    x_ticks = tuple(Tick(LEFT + i * step + step / 2, TOP + HEIGHT + 16, time.strftime(label, time.gmtime(minute)))
                    for i, (minute, _) in enumerate(minutes) if i % 10 == 0 or i == len(minutes) - 1)
    total = {name: sum(counts[name] for _, counts in minutes) for name, _ in series}
    return Chart(title, series, tuple(bars), y_ticks, x_ticks, total)


def _nice(peak: int) -> int:
    """The y axis's top: ``peak`` rounded up to 2, 4, 6 or 10 times a power
    of ten (even, so that its half, the middle tick, is whole)."""
    scale = 1
    while True:
        for nice in (2, 4, 6, 10):
            if nice * scale >= peak:
                return nice * scale
        scale *= 10


THROUGHPUT = (("done", "done"), ("retried", "failed, retried"), ("failed", "failed for good"))
FAILURES = (("retried", "failed, retried"), ("failed", "failed for good"), ("expired", "lease expired"))


def charts(minutes: Sequence[tuple[int, Mapping[str, Counts]]], queue: str = "") -> list[Chart]:
    """The charts page: runs per minute, and failures per minute."""
    summed = totals_of(minutes, queue)
    return [stacked("Runs per minute", summed, THROUGHPUT), stacked("Failures per minute", summed, FAILURES)]
