"""Redis' clock, read locally.

Lease deadlines, due times and the timefile compare times taken by different
processes, often on different hosts, whose clocks may disagree by seconds. So
every process of an installation reads one clock, Redis' ``TIME``: the offset
of the local clock to it is measured once a minute (one cheap round trip) and
added to the local time in between.

One measurement only bounds the offset: Redis read its clock somewhere within
the round trip. The estimate is the offset in those bounds closest to zero, so
processes on Redis' own host, or on hosts whose clocks agree with it to within
a round trip, keep their local time exactly; a skewed clock is corrected to
within a round trip.
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
        if isinstance(client, redis.client.Pipeline):  # TIME must not join its queued commands
            client = redis.Redis(connection_pool=client.connection_pool)
        self.client = client
        self.every = every
        self.offset = 0.0  # seconds to add to the local clock; 0 until Redis answers
        self._next = float("-inf")  # monotonic time of the next measurement
        # Measured now, so that processes forked later (a pool's slots) start with an
        # offset and ask Redis again only a minute on.
        self.measure()

    def __call__(self) -> float:
        if time.monotonic() >= self._next:
            self.measure()
        return time.time() + self.offset

    def measure(self) -> None:
        """Read Redis' TIME; on a Redis error keep the last offset and try again soon."""
        sent = time.time()
        try:
            seconds, micros = self.client.time()
        except redis.RedisError as exc:
            self._next = time.monotonic() + RETRY_SECONDS
            log.debug("cannot read Redis' clock (%s); keeping the offset %.3fs", exc, self.offset)
            return
        received = time.time()
        remote = seconds + micros / 1e6
        # Redis' time lies between the send and the receipt: so does the offset.
        self.offset = min(max(0.0, remote - received), remote - sent)
        self._next = time.monotonic() + self.every
