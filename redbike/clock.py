"""Redis' clock, read locally.

Lease deadlines, due times and the timefile compare times taken by different
processes, often on different hosts; their clocks may disagree by seconds. So
every process of an installation reads one clock, Redis' ``TIME``: measured
once a minute (one cheap round trip, its midpoint taken as the moment Redis
answered), and extrapolated in between with the local monotonic clock, which
a stepped or skewed wall clock does not move. The error is about half a round
trip, plus the drift of the local clock's rate over a minute.
"""

from __future__ import annotations

import logging
import time

import redis

log = logging.getLogger(__name__)

MEASURE_SECONDS = 60.0  # how often the offset to Redis' clock is measured again
RETRY_SECONDS = 1.0  # after a failed measurement


class RedisClock:
    """A callable returning Redis' time in epoch seconds. Safe to share between
    threads and across fork: it keeps no lock and holds only the client, whose
    connection pool makes new connections in a forked child."""

    def __init__(self, client: redis.Redis, every: float = MEASURE_SECONDS) -> None:
        self.client = client
        self.every = every
        self._base: tuple[float, float] | None = None  # (Redis' time, monotonic time) of a measurement
        self._next = float("-inf")  # monotonic time of the next measurement

    def __call__(self) -> float:
        if time.monotonic() >= self._next:
            self.measure()
        base = self._base
        if base is None:  # Redis never answered: nothing to agree on yet
            return time.time()
        return base[0] + (time.monotonic() - base[1])

    def measure(self) -> None:
        """Read Redis' TIME; on a Redis error keep the last measurement and try again soon."""
        sent = time.monotonic()
        try:
            seconds, micros = self.client.time()
        except redis.RedisError as exc:
            self._next = time.monotonic() + RETRY_SECONDS
            log.debug("cannot read Redis' clock (%s); using the last reading", exc)
            return
        received = time.monotonic()
        self._base = (seconds + micros / 1e6, (sent + received) / 2)
        self._next = received + self.every
