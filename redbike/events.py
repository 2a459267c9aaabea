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
- ``retried``: where a run that failed or did not complete was ended with a
  retry (status RTY or EXP, the same occurrence, a later attempt): in the
  child, the supervisor or the dispatcher's reaper, after ``failed`` or
  ``expired``.
- ``idle``: in a slot's child, when a claim found no job and the slot waits
  for one (not a job's event, but where a slot stops having one: a slot that
  claims its next job as its run ends goes from one run to the next without).

Not here: ``parked`` and ``woken`` (the claim script's reply does not say
which jobs it parked or woke, only that it parked many); the job's trail
in Redis records them.

Hooks get the run's Lease (job id, token, queue, worker, since, timeout):
what the worker that ran it and the dispatcher that reaped it both know.

Subscribers are called in the calling process, one after another, on the
job's path: they must be quick and must not raise. Those subscribed before
WorkerPool.run() are in every child too (the children are forked).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .roundrobin import Lease
from .states import EXP, RTY, Outcome, Placement

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

    def retried(self, lease: Lease, attempt: int, at: float) -> None:
        """The run's occurrence runs again, as ``attempt``, at ``at`` (a backoff)."""

    def idle(self) -> None:
        """This slot found no job to claim and waits for one."""


class Events(Subscriber):
    """Calls every subscriber's hook, in the order they subscribed. A hook a
    subscriber leaves as Subscriber's (one that does nothing) is not called:
    claimed and finished are on every job's path."""

    def __init__(self, *subscribers: Subscriber) -> None:
        self.subscribers: list[Subscriber] = []
        self._claimed: list[Callable[[Lease], None]] = []
        self._finished: list[Callable[[Lease, Outcome, float], None]] = []
        self._failed: list[Callable[[Lease, Outcome, float, str], None]] = []
        self._expired: list[Callable[[Lease, str], None]] = []
        self._retried: list[Callable[[Lease, int, float], None]] = []
        self._idle: list[Callable[[], None]] = []
        for subscriber in subscribers:
            self.subscribe(subscriber)

    def subscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.append(subscriber)
        for hook in ("claimed", "finished", "failed", "expired", "retried", "idle"):
            method = getattr(subscriber, hook)
            if getattr(method, "__func__", None) is not getattr(Subscriber, hook):
                getattr(self, f"_{hook}").append(method)

    def claimed(self, lease: Lease) -> None:
        for hook in self._claimed:
            hook(lease)

    def finished(self, lease: Lease, outcome: Outcome, seconds: float) -> None:
        for hook in self._finished:
            hook(lease, outcome, seconds)

    def failed(self, lease: Lease, outcome: Outcome, seconds: float, trace: str) -> None:
        for hook in self._failed:
            hook(lease, outcome, seconds, trace)

    def expired(self, lease: Lease, reason: str) -> None:
        for hook in self._expired:
            hook(lease, reason)

    def retried(self, lease: Lease, attempt: int, at: float) -> None:
        for hook in self._retried:
            hook(lease, attempt, at)

    def idle(self) -> None:
        for hook in self._idle:
            hook()


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

    def retried(self, lease: Lease, attempt: int, at: float) -> None:
        log.info("job %s: runs again (attempt %d) at %s", lease.jobid, attempt,
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)))


def tell_retry(events: Subscriber, lease: Lease, placement: Placement | None) -> None:
    """Call ``retried`` if ``placement`` (where an ended run's job went) is a retry."""
    if placement is not None and placement.kind == "T" and placement.attempt and placement.attempt > 1 \
            and placement.at is not None and placement.status in (RTY, EXP):
        events.retried(lease, placement.attempt, placement.at)
