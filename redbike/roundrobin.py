"""The worker contract: subclass RoundRobin and override work()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class StopWork(Exception):
    """Raised by work(): set the job's schedule to STOP (status STP)."""


class UnsetJob(Exception):
    """Raised by work(): unset the job (remove it from the rotation)."""


@dataclass(frozen=True)
class Lease:
    """The claim on the job being worked. ``token`` is unique to this run: a
    job can store it beside its side effects to tell a stale run from the
    current one. ``due`` is the nominal time of the occurrence the run is for
    (the time its schedule gave, however late it runs: a nightly report's
    date), ``attempt`` which run of that occurrence it is (1: the first; more
    after failures, see retries)."""

    jobid: str
    token: str
    queue: str
    worker: str
    since: float
    timeout: float
    due: float | None = None
    attempt: int = 1

    @classmethod
    def claimed(cls, jobid: str, token: str, queue: str, worker: str, since: float, timeout: float,
                due: float | None, attempt: int) -> Lease:
        """The same as Lease(...), on every claimed job's path: a frozen
        dataclass's __init__ sets each field through object.__setattr__, which
        costs three times as much as filling the new instance's __dict__
        (about 0.6 us a job). A test holds the two equal, field for field."""
        lease = _new_object(cls)
        fields = lease.__dict__
        fields["jobid"], fields["token"], fields["queue"], fields["worker"] = jobid, token, queue, worker
        fields["since"], fields["timeout"], fields["due"], fields["attempt"] = since, timeout, due, attempt
        return lease


_new_object = object.__new__


class RoundRobin:
    """A worker that takes jobs from queues in a weighted rotation.

    ``RoundRobin("A:A:B")`` works queue A twice as often as queue B. A job goes
    to the queue named by the part of its id after the last ``:`` (the whole
    id if it has none). While work() runs, ``self.lease`` holds its Lease
    and ``self.data`` the job's payload (None if it has none).
    """

    def __init__(self, queues: str = "") -> None:
        self.queues = [name for name in queues.split(":") if name]
        self.lease: Lease | None = None
        self.data: Any = None
        # While work() runs in a pool: asks Redis whether the job is still set.
        self.job_probe: Callable[[], bool] | None = None

    def still_set(self) -> bool:
        """Whether the job work() runs is still set: False once it was unset
        while it ran (its run then ends as the unset job's, whatever it
        returns). One round trip to Redis; a long work() may ask now and then
        and give up early, as the executors do. Outside a pool: True."""
        return True if self.job_probe is None else self.job_probe()

    def queue_names(self) -> list[str]:
        """Queues to work, in rotation order; a repeated name gets more turns."""
        return list(self.queues)

    def queue_for(self, jobid: str) -> str:
        """The queue a job is put in when it falls due."""
        return jobid.rsplit(":", 1)[-1]

    def needs(self, jobid: str) -> dict[str, int] | str | None:
        """Resources a job needs, derived from its id when it is set
        ({"host:db-17": 1} or "host:db-17,db:db42=1"); None for none."""
        return None

    def timeout(self, queue_name: str) -> float | None:
        """Seconds a job from this queue may run; None for the default."""
        return None

    def work(self, jobid: str) -> int | None:
        """Do the job. Return an integer to back a CONTINUE job off that many
        seconds; raise StopWork or UnsetJob to stop or unset it."""
        raise NotImplementedError("subclass RoundRobin and override work()")
