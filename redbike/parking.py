"""The records of the waiting lines (waiting.lua: park, wake, set aside),
encoded and decoded here as records.py does the others: a job in line for a
resource (a member of P:parked), a woken one (P:ready), one that needs more
than a capacity (P:aside), and each such job's parking value (P:parking).
tests/test_contract.py checks that Lua reads them as written here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .records import SEP, RecordError

# -- parked and ready members, and the parking value (waiting.lua: park, wake) -

@dataclass(frozen=True)
class Parked:
    """A job in line for ``resource`` (a member of the parked zset)."""

    resource: str
    seq: str
    queue: str
    jobid: str


@dataclass(frozen=True)
class Ready:
    """A woken job, claimed before its queue's list (a member of the ready zset)."""

    queue: str
    seq: str
    jobid: str


@dataclass(frozen=True)
class Woken:
    """A woken job's parking value: the amount of ``resource`` set aside for it."""

    resource: str
    amount: int
    ready: Ready


def encode_parked(parked: Parked) -> str:
    return SEP.join([parked.resource, parked.seq, parked.queue, parked.jobid])


def decode_parked(member: str) -> Parked:
    parts = member.split(SEP, 3)
    if len(parts) != 4:
        raise RecordError(f"bad parked member {member!r}")
    return Parked(*parts)


def encode_ready(ready: Ready) -> str:
    return SEP.join([ready.queue, ready.seq, ready.jobid])


def decode_ready(member: str) -> Ready:
    parts = member.split(SEP, 2)
    if len(parts) != 3:
        raise RecordError(f"bad ready member {member!r}")
    return Ready(*parts)


@dataclass(frozen=True)
class Aside:
    """A job that needs ``amount`` of ``resource``, more than its capacity
    (a member of the aside zset: "resource|amount|seq|queue|jobid", the
    amount zero-padded so that a resource's jobs sort by amount)."""

    resource: str
    amount: int
    seq: str
    queue: str
    jobid: str


@dataclass(frozen=True)
class SetAside:
    """An aside job's parking value: the capacity it was found to exceed."""

    capacity: int
    aside: Aside


AMOUNT_DIGITS = 10  # MAX_AMOUNT (10**9) written with leading zeros (set_aside() in waiting.lua)


def encode_aside(aside: Aside) -> str:
    return SEP.join([aside.resource, f"{aside.amount:0{AMOUNT_DIGITS}d}", aside.seq, aside.queue, aside.jobid])


def decode_aside(member: str) -> Aside:
    parts = member.split(SEP, 4)
    if len(parts) != 5 or not parts[1].isdigit():
        raise RecordError(f"bad aside member {member!r}")
    resource, amount, seq, queue, jobid = parts
    return Aside(resource, int(amount), seq, queue, jobid)


def encode_parking(place: Parked | Woken | SetAside) -> str:
    """'P' + parked member, 'R' + resource=amount|ready member, or
    'A' + capacity|aside member."""
    if isinstance(place, Parked):
        return "P" + encode_parked(place)
    if isinstance(place, SetAside):
        return f"A{place.capacity}{SEP}{encode_aside(place.aside)}"
    return f"R{place.resource}={place.amount}{SEP}{encode_ready(place.ready)}"


# A job with alternative paths (replicas) that found none with room waits in
# line for the first full resource of each path: its parking value is "P"
# and those parked members (one per line, all with the same seq) joined by
# LINES_SEP, which no job id holds (names: no control character).
LINES_SEP = "\n"


def encode_parked_lines(lines: Sequence[Parked]) -> str:
    """The parking value of a job in line for several resources (the first, for one)."""
    return "P" + LINES_SEP.join(encode_parked(parked) for parked in lines)


def parked_lines(value: str) -> list[Parked]:
    """The lines a parked job is in (its parking value: "P" + members)."""
    if not value.startswith("P"):
        raise RecordError(f"bad parking value {value!r}")
    return [decode_parked(member) for member in value[1:].split(LINES_SEP)]


def decode_parking(value: str) -> Parked | Woken | SetAside:
    """What a job's parking value says (a job in several lines: the first)."""
    if value.startswith("P"):
        return parked_lines(value)[0]
    if value.startswith("A"):
        capacity, sep, aside = value[1:].partition(SEP)
        if sep and capacity.isdigit():
            return SetAside(int(capacity), decode_aside(aside))
    if value.startswith("R"):
        held, sep, ready = value[1:].partition(SEP)
        resource, _, amount = held.partition("=")
        if sep and amount.isdigit():
            return Woken(resource, int(amount), decode_ready(ready))
    raise RecordError(f"bad parking value {value!r}")
