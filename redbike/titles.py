"""Process titles, so that ``ps`` tells redbike's processes apart:
``redbike work supervisor A:B``, ``redbike work zygote``, ``redbike work
slot 3`` (``... running JOBID`` while it runs one), ``redbike dispatch
(leader)`` or ``(standby)``.

A slot's title changes once per job (one prctl system call, about a
microsecond: measured, see the README), from the job events seam, in the
slot's child: to the job when it starts, and back to the idle title only
when the slot finds no next job (a busy slot goes from one job's title to
the next). Without ``setproctitle`` installed the titles stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

from .events import Subscriber
from .roundrobin import Lease

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
    """Called in a slot's child (claimed and idle happen nowhere else): the
    title says which job the slot runs. On every job's path, so the titles
    are made once per slot, and a run's end changes nothing: the slot's next
    claim does (the next job's title, or the idle one), saving a system call
    per job."""

    def __init__(self) -> None:
        self.worker = ""
        self.idle_title = self.running = ""
        self.shows_job = False

    def claimed(self, lease: Lease) -> None:
        if lease.worker != self.worker:  # the first job of this slot's child
            self.worker, self.idle_title = lease.worker, slot_title(lease.worker)
            self.running = f"{self.idle_title} running "
        if _set is not None:
            _set(self.running + lease.jobid)
            self.shows_job = True

    def idle(self) -> None:
        if self.shows_job and _set is not None:
            _set(self.idle_title)
            self.shows_job = False
