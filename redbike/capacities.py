"""Setting resources' capacities: capacity.lua, one call per resource.

A capacity that grows wakes the jobs waiting for the resource, at most
WAKE_BATCH per call (one script call must not block Redis for long), so a
call that woke a full batch is followed by more until one wakes fewer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .keys import WAKE_BATCH
from .resources import check_capacity, check_name
from .scripts import Scripts


def _args(resource: str, capacity: int | None) -> list[Any]:
    return [resource, "" if capacity is None else capacity]


def write_capacity(scripts: Scripts, clock: Callable[[], float], resource: str, capacity: int | None) -> int:
    """Set a resource's capacity (0 pauses it, None makes it unlimited);
    returns how many waiting jobs it woke."""
    args = _args(check_name(resource), check_capacity(capacity))
    woken = total = int(scripts.run("capacity", clock(), [], args))
    while woken >= WAKE_BATCH:  # many woke, or came back in line: the rest, a batch at a time
        woken = int(scripts.run("capacity", clock(), [], args))
        total += woken
    return total


def write_capacities(client: Any, scripts: Scripts, clock: Callable[[], float],
                     capacities: Iterable[tuple[str, int | None]]) -> dict[str, int]:
    """Set many resources' capacities in one round trip (capacity.lua for
    each, pipelined on ``client``; all checked first); returns how many
    waiting jobs each woke. One that woke a full batch is carried on as
    write_capacity does."""
    pairs = [(check_name(resource), check_capacity(capacity)) for resource, capacity in capacities]
    if not pairs:
        return {}
    now = clock()
    with client.pipeline(transaction=False) as pipe:
        for resource, capacity in pairs:
            scripts.run("capacity", now, [], _args(resource, capacity), client=pipe)
        results = pipe.execute()
    woken: dict[str, int] = {}
    for (resource, capacity), result in zip(pairs, results, strict=True):
        woken[resource] = result + (write_capacity(scripts, clock, resource, capacity) if result >= WAKE_BATCH else 0)
    return woken
