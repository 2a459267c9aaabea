"""Feed functions and a worker for tests/test_feed.py (copied into each
test's folder, as testworker.py is).

numbers(count, prefix): items PREFIX0 ... with their index as cursor.
plain(count): job ids only (the cursor is the id); sized(count): a list.
Count (worker): HINCRBY TESTLOG_KEY:runs JOBID 1 for each run; jobs whose id
starts with "fail" raise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import redis

from redbike import RoundRobin
from redbike.feed import Item, Total, feed_source


@feed_source
def numbers(last: int | None = None, count: str = "100", prefix: str = "n") -> Iterator[Any]:
    start = 0 if last is None else last + 1
    yield Total(int(count) - start)
    for i in range(start, int(count)):
        yield Item(f"{prefix}{i}", cursor=i)


@feed_source
def plain(last: str | None = None, count: str = "10") -> Iterator[str]:
    start = 0 if last is None else int(last.removeprefix("p")) + 1
    for i in range(start, int(count)):
        yield f"p{i}"


@feed_source
def sized(last: str | None = None, count: str = "10") -> list[tuple[str, dict[str, int]]]:
    start = 0 if last is None else int(last.removeprefix("s")) + 1
    return [(f"s{i}", {"i": i}) for i in range(start, int(count))]


@feed_source
def raising(last: Any = None, after: str = "3") -> Iterator[str]:
    for i in range(int(after)):
        yield f"r{i}"
    raise RuntimeError("the source broke")


@feed_source
def bad(last: Any = None, what: str = "int") -> Iterator[Any]:
    yield "good0"
    yield {"int": 42, "set": ("b1", {1, 2}), "triple": ("a", 1, 2), "nan": ("b2", float("nan"))}[what]


@feed_source
def broken_call(count: str) -> Iterator[str]:  # takes no `last`
    yield "x"


def unmarked(last: Any = None) -> Iterator[str]:
    yield "u0"


class Count(RoundRobin):
    """Counts each run of each job; fail-... raises."""

    def __init__(self, queues: str = "F") -> None:
        super().__init__(queues)
        self._log: redis.Redis | None = None

    def work(self, jobid: str) -> None:
        if self._log is None:
            self._log = redis.Redis.from_url(os.environ["TESTLOG_URL"])
        self._log.hincrby(os.environ["TESTLOG_KEY"] + ":runs", jobid, 1)
        if jobid.startswith("fail"):
            raise ValueError("failed on purpose")
