"""Process titles, so that ``ps`` tells redbike's processes apart:
``redbike work supervisor A:B``, ``redbike work zygote``, ``redbike work
slot 3`` (``... running JOBID`` while it runs one), ``redbike dispatch
(leader)`` or ``(standby)``.

A slot's title changes twice per job (one prctl system call each, about a
microsecond: measured, see the README), from the job events seam, in the
slot's child. Without ``setproctitle`` installed the titles stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from .events import Subscriber
from .roundrobin import Lease
from .states import Outcome

_set: Callable[[str], None] | None
try:
    from setproctitle import setproctitle as _set
except ImportError:  # pragma: no cover - a core dependency; kept optional for odd platforms
    _set = None


def set_title(title: str) -> None:
    if _set is not None:
        _set(title)


def slot_title(worker: str, jobid: str | None = None) -> str:
    """A slot's title; ``worker`` is its lease's worker id, ``host:pid:slot``."""
    title = f"redbike work slot {worker.rpartition(':')[2]}"
    return f"{title} running {jobid}" if jobid is not None else title


class SlotTitles(Subscriber):
    """Called in a slot's child (claimed, finished, failed happen nowhere
    else): the title says which job the slot runs. On every job's path, so
    the titles are made once per slot (about 2 us per job in all)."""

    def __init__(self) -> None:
        self.worker = ""
        self.idle = self.running = ""

    def claimed(self, lease: Lease) -> None:
        if lease.worker != self.worker:  # the first job of this slot's child
            self.worker, self.idle = lease.worker, slot_title(lease.worker)
            self.running = f"{self.idle} running "
        if _set is not None:
            _set(self.running + lease.jobid)

    def finished(self, lease: Lease, outcome: Outcome, seconds: float) -> None:
        if _set is not None and self.idle:
            _set(self.idle)

    def failed(self, lease: Lease, outcome: Outcome, seconds: float, trace: str) -> None:
        self.finished(lease, outcome, seconds)
