"""Warnings about an outage (Redis unreachable) from a retry loop, rate-limited.

A loop that retries every few seconds while Redis is down would log the
same warning on every try. An Outage logs one warning when the errors
start, then at most one every ``every`` seconds with the number of failed
tries since, and one INFO line when a try succeeds again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

T = TypeVar("T")

REPEAT_SECONDS = 60.0


class Outage:
    """The errors of one retry loop (``what``: "slot 2", "heartbeat" ...)."""

    def __init__(self, logger: logging.Logger, what: str, every: float = REPEAT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = logger
        self.what = what
        self.every = every
        self.clock = clock
        self.since: float | None = None  # when the errors started; None while all is well
        self.logged_at = 0.0
        self.unlogged = 0  # failed tries since the last warning
        self.tries = 0  # failed tries since the errors started

    def failed(self, error: BaseException, retry_in: float | None = None) -> None:
        """A try failed with ``error``; the next is in ``retry_in`` seconds."""
        now = self.clock()
        self.tries += 1
        retry = "" if retry_in is None else f"; retrying in {retry_in:.1f}s"
        if self.since is None:
            self.since, self.logged_at, self.unlogged = now, now, 0
            self.log.warning("%s: Redis error (%s)%s", self.what, error, retry)
        elif now - self.logged_at >= self.every:
            self.log.warning("%s: Redis error for %.0fs, %d failed tries since the last warning (now: %s)%s",
                             self.what, now - self.since, self.unlogged + 1, error, retry)
            self.logged_at, self.unlogged = now, 0
        else:
            self.unlogged += 1

    def recovered(self) -> None:
        """A try succeeded: say so if errors came before it."""
        if self.since is not None:
            self.log.info("%s: Redis reachable again after %.1fs (%d failed tries)",
                          self.what, self.clock() - self.since, self.tries)
            self.since, self.tries = None, 0


def retried(step: Callable[[], T], outage: Outage, stopped: Callable[[], bool]) -> T | None:
    """``step()``, tried again (backing off up to 5 s) while it fails because
    Redis cannot be reached: a daemon's first commands, which a Redis restart
    can hit right after the daemon found Redis up. None if ``stopped()``
    before it succeeded."""
    retry_in = 0.0
    while not stopped():
        try:
            result = step()
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # BusyLoadingError too: a restart reading its AOF
            retry_in = min(retry_in * 2 or 0.1, 5.0)
            outage.failed(exc, retry_in)
            waited = 0.0
            while waited < retry_in and not stopped():  # a signal ends the wait within 0.1 s
                time.sleep(0.1)
                waited += 0.1
            continue
        if retry_in:
            outage.recovered()
        return result
    return None
