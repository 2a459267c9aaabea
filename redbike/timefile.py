"""The timefile: the time up to which the dispatcher has enqueued due jobs."""

from __future__ import annotations

import logging
import os
import tempfile

from .schedules import timestamp_problem

log = logging.getLogger(__name__)


class TimefileError(ValueError):
    """The timefile cannot be written; the message is one line for a user."""


def read_timefile(path: str | None) -> float | None:
    """The recorded time, or None when there is no (readable, sensible) timefile.
    A time that is not one (nan, inf, past year 9999) is ignored with a warning."""
    if not path:
        return None
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read().strip()
        when = float(text)
    except (OSError, ValueError):
        return None
    problem = timestamp_problem(when)
    if problem:
        log.warning("timefile %s holds %r (%s); ignored", path, text[:40], problem)
        return None
    return when


def check_timefile(path: str | None) -> None:
    """Raise TimefileError unless the timefile can be written: its folder exists and
    takes new files, and the path is not a folder. Writes nothing that stays."""
    if not path:
        return
    if os.path.isdir(path):
        raise TimefileError(f"timefile {path} is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".timefile.")
    except OSError as exc:
        raise TimefileError(f"timefile {path} cannot be written: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(temp)


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
