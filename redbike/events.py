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
  or its child died; in the child when ending a run found its lease gone;
  in the dispatcher when it reaped a lease whose deadline passed.

Not here yet: ``retried`` (there is no retry policy to call it before the
next issue), ``parked`` and ``woken`` (the claim script's reply does not say
which jobs it parked or woke, only that it parked many).

Hooks get the run's Lease (job id, token, queue, worker, since, timeout):
what the worker that ran it and the dispatcher that reaped it both know.

Subscribers are called in the calling process, one after another, on the
job's path: they must be quick and must not raise. Those subscribed before
WorkerPool.run() are in every child too (the children are forked).
"""

from __future__ import annotations

import logging

from .roundrobin import Lease
from .states import Outcome

log = logging.getLogger(__name__)


class Subscriber:
    """Override the hooks you need; the others do nothing."""

    def claimed(self, lease: Lease) -> None:
        """A claim leased ``lease.jobid`` to this pool."""

    def finished(self, lease: Lease, outcome: Outcome, seconds: float) -> None:
        """work() returned after ``seconds``, or stopped or unset its job."""

    def failed(self, lease: Lease, outcome: Outcome, seconds: float, trace: str) -> None:
        """work() raised after ``seconds``: ``outcome.error`` is "Type: message"."""

    def expired(self, lease: Lease, reason: str) -> None:
        """The run did not complete: killed, its process died, its lease was lost
        or reaped."""


class Events(Subscriber):
    """Calls every subscriber's hook, in the order they subscribed."""

    def __init__(self, *subscribers: Subscriber) -> None:
        self.subscribers = list(subscribers)

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)

    def claimed(self, lease: Lease) -> None:
        for subscriber in self.subscribers:
            subscriber.claimed(lease)

    def finished(self, lease: Lease, outcome: Outcome, seconds: float) -> None:
        for subscriber in self.subscribers:
            subscriber.finished(lease, outcome, seconds)

    def failed(self, lease: Lease, outcome: Outcome, seconds: float, trace: str) -> None:
        for subscriber in self.subscribers:
            subscriber.failed(lease, outcome, seconds, trace)

    def expired(self, lease: Lease, reason: str) -> None:
        for subscriber in self.subscribers:
            subscriber.expired(lease, reason)


class LogEvents(Subscriber):
    """The log: one WARNING line per failed or expired run; the start and end
    of every run at DEBUG (``-v``)."""

    def claimed(self, lease: Lease) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s: started (queue %s, worker %s, timeout %gs)", lease.jobid, lease.queue, lease.worker,
                      lease.timeout)

    def finished(self, lease: Lease, outcome: Outcome, seconds: float) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s: ended (%s) after %.3fs", lease.jobid, outcome.kind, seconds)

    def failed(self, lease: Lease, outcome: Outcome, seconds: float, trace: str) -> None:
        log.warning("job %s: failed after %.3fs: %s", lease.jobid, seconds, outcome.error)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("job %s: %s", lease.jobid, trace.rstrip())

    def expired(self, lease: Lease, reason: str) -> None:
        log.warning("job %s: %s", lease.jobid, reason)
