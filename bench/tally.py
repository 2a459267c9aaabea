"""The one thing every benchmark no-op job does: append one byte to the file
named by $BENCH_TALLY (opened once per process, O_APPEND, one write(2) per
job, a microsecond or two). The benchmark counts finished jobs by the file's
size, so it never has to ask Redis while it measures Redis traffic, and every
system under test (redbike and its peers) pays the same for it."""

from __future__ import annotations

import os

_fd: int | None = None
_pid: int | None = None


def tally() -> None:
    global _fd, _pid
    if _fd is None or _pid != os.getpid():  # a forked child opens its own
        path = os.environ.get("BENCH_TALLY")
        if not path:
            return
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _pid = os.getpid()
    os.write(_fd, b".")


def count(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def stamp(line: str) -> None:
    """Append one line to $BENCH_STAMPS (latency runs)."""
    path = os.environ.get("BENCH_STAMPS")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
