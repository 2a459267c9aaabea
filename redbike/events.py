"""Job events: the one hook interface that the places where a worker sees
a job change state call, and that logging (and later the job trail,
metrics, a web UI) subscribe to, instead of reaching into the pool.

Where each hook is called, and in which process:

- ``claimed``: in a slot's child, when a claim leased it a job, just before
  work() runs.
- ``finished``: in the child, when work() returned, or raised StopWork or
  UnsetJob (outcome kind ok, stop or unset).
- ``failed``: in the child, when work() raised anything else (kind error).
- ``expired``: wherever a run is found not to have completed: in the
  supervisor when it killed a run (timeout, forced stop, lease found lost)
  or its child died; in the child when ending a run found its lease gone.

Not here yet: ``retried`` (there is no retry policy to call it before the
next issue), ``parked`` and ``woken`` (the claim script's reply does not say
which jobs it parked or woke, only that it parked many), and the reaping
done by the dispatcher (it runs no pool).

Subscribers are called in the calling process, one after another, on the
job's path: they must be quick and must not raise. Those subscribed before
WorkerPool.run() are in every child too (the children are forked).
"""

from __future__ import annotations

import logging

from .slots import Running
from .states import Outcome

log = logging.getLogger(__name__)


class Subscriber:
    """Override the hooks you need; the others do nothing."""

    def claimed(self, run: Running) -> None:
        """A claim leased ``run``'s job to this pool."""

    def finished(self, run: Running, outcome: Outcome, seconds: float) -> None:
        """work() returned after ``seconds``, or stopped or unset its job."""

    def failed(self, run: Running, outcome: Outcome, seconds: float, trace: str) -> None:
        """work() raised after ``seconds``: ``outcome.error`` is "Type: message"."""

    def expired(self, run: Running, reason: str) -> None:
        """The run did not complete: killed, its process died, or its lease was lost."""


class Events(Subscriber):
    """Calls every subscriber's hook, in the order they subscribed."""

    def __init__(self, *subscribers: Subscriber) -> None:
        self.subscribers = list(subscribers)

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def claimed(self, run: Running) -> None:
        for subscriber in self.subscribers:
            subscriber.claimed(run)

    def finished(self, run: Running, outcome: Outcome, seconds: float) -> None:
        for subscriber in self.subscribers:
            subscriber.finished(run, outcome, seconds)

    def failed(self, run: Running, outcome: Outcome, seconds: float, trace: str) -> None:
        for subscriber in self.subscribers:
            subscriber.failed(run, outcome, seconds, trace)

    def expired(self, run: Running, reason: str) -> None:
        for subscriber in self.subscribers:
            subscriber.expired(run, reason)


class LogEvents(Subscriber):
    """The log: one WARNING line per failed or expired run; the start and end
    of every run at DEBUG (``-v``)."""

    def claimed(self, run: Running) -> None:
        if log.isEnabledFor(logging.DEBUG):
            lease = run.lease
            log.debug("job %s: started (queue %s, worker %s, timeout %gs)", lease.jobid, lease.queue, lease.worker,
                      lease.timeout)

    def finished(self, run: Running, outcome: Outcome, seconds: float) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s: ended (%s) after %.3fs", run.lease.jobid, outcome.kind, seconds)

    def failed(self, run: Running, outcome: Outcome, seconds: float, trace: str) -> None:
        log.warning("job %s: failed after %.3fs: %s", run.lease.jobid, seconds, outcome.error)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s: %s", run.lease.jobid, trace.rstrip())

    def expired(self, run: Running, reason: str) -> None:
        log.warning("job %s: %s", run.lease.jobid, reason)
