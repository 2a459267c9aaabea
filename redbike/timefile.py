"""The timefile: the time up to which the dispatcher has enqueued due jobs."""

from __future__ import annotations

import os
import tempfile


def read_timefile(path: str | None) -> float | None:
    """The recorded time, or None when there is no (readable) timefile."""
    if not path:
        return None
    try:
        with open(path, encoding="ascii") as handle:
            return float(handle.read().strip())
    except (OSError, ValueError):
        return None


def write_timefile(path: str, when: float) -> None:
    """Replace the timefile atomically and durably: a crash leaves the old or
    the new time, never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".timefile.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(f"{when:.6f}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
