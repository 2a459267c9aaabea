"""The job events seam (events.py): Events calls each subscriber's own hooks."""

from __future__ import annotations

from redbike.events import Events, Subscriber
from redbike.roundrobin import Lease
from redbike.states import OK, Outcome

LEASE = Lease("j:A", "0123456789abcdef", "A", "host:1:0", 1.0, 10.0)


class Heard(Subscriber):
    """Overrides two hooks, and hears them in a shared list."""

    def __init__(self, name: str, heard: list[str]) -> None:
        self.name, self.heard = name, heard

    def claimed(self, lease: Lease) -> None:
        self.heard.append(f"{self.name} claimed {lease.jobid}")

    def idle(self) -> None:
        self.heard.append(f"{self.name} idle")


class HeardMore(Heard):
    """A subclass: inherits two hooks, overrides a third."""

    def finished(self, lease: Lease, outcome: Outcome, seconds: float) -> None:
        self.heard.append(f"{self.name} finished {lease.jobid} {outcome.kind}")


def test_every_hook_a_subscriber_has_is_called_in_the_order_they_subscribed() -> None:
    heard: list[str] = []
    events = Events(Heard("first", heard))
    events.subscribe(HeardMore("second", heard))
    patched = Subscriber()
    patched.retried = lambda lease, attempt, at: heard.append(f"patched retried {attempt}")  # type: ignore[method-assign]
    events.subscribe(patched)
    events.subscribe(Events(Heard("nested", heard)))  # an Events is a subscriber too
    events.claimed(LEASE)
    events.finished(LEASE, OK, 0.5)
    events.failed(LEASE, Outcome("error", error="E: x"), 0.5, "trace")
    events.expired(LEASE, "killed")
    events.retried(LEASE, 2, 5.0)
    events.idle()
    assert heard == [
        "first claimed j:A", "second claimed j:A", "nested claimed j:A",
        "second finished j:A ok",
        "patched retried 2",
        "first idle", "second idle", "nested idle",
    ]
