"""The rate-limited Redis-down warnings of a retry loop (pure logic, a fake clock)."""

from __future__ import annotations

import logging

import pytest
import redis

from redbike.outage import Outage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_warning_then_one_a_minute_with_a_count_then_info(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    outage = Outage(logging.getLogger("redbike.test"), "slot 0", every=60, clock=clock)
    caplog.set_level(logging.INFO, "redbike.test")
    outage.recovered()  # nothing failed: nothing to say
    error = redis.ConnectionError("Connection refused")
    for _ in range(40):  # every 5 s for 200 s
        outage.failed(error, 5.0)
        clock.now += 5
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    repeated = [
        ("WARNING", (f"slot 0: Redis error for {seconds}s, 12 failed tries since the last warning "
                    "(now: Connection refused); retrying in 5.0s"))
        for seconds in (60, 120, 180)
    ]
    assert lines == [("WARNING", "slot 0: Redis error (Connection refused); retrying in 5.0s"), *repeated]
    caplog.clear()
    outage.recovered()
    outage.recovered()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "slot 0: Redis reachable again after 200.0s (40 failed tries)"),
    ]
    caplog.clear()
    outage.failed(error)  # a new outage starts with a warning again
    assert [r.getMessage() for r in caplog.records] == ["slot 0: Redis error (Connection refused)"]
