"""A feed's function and its items (`redbike feed`, feed.py).

The function is named like a worker (``module:function``, parsed and never
evaluated) and must be marked with :func:`feed_source`, so that a spec cannot
name ``os:system``; it is called ``function(last=CURSOR, **args)`` and yields
(or returns an iterable of) items: a job id, ``(jobid, data)``, an
:class:`Item` with its own cursor, or a :class:`Total`. Each is checked
(:func:`check_item`) before its batch goes in.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from .names import BadName, check_jobid
from .records import DEFAULT_MAX_DATA_BYTES, DataError, encode_data
from .workerspec import WorkerSpecError, parse_spec

MARK = "__redbike_feed_source__"
F = TypeVar("F", bound=Callable[..., Any])


def feed_source(function: F) -> F:
    """Mark ``function`` as one `redbike feed` may call: only marked
    functions are, so a spec cannot name ``os:system`` or the like."""
    setattr(function, MARK, True)
    return function


class Item(NamedTuple):
    """An item with its own cursor: the feed resumes with ``last=cursor``
    after it (JSON: a string, a number, a list...)."""

    jobid: str
    data: Any = None
    cursor: Any = None


class Total(NamedTuple):
    """Yielded by a feed function: ``remaining`` items follow (for the ETA)."""

    remaining: int


class BadItem(ValueError):
    """The function yielded something that is not an item (exit 2)."""


class SourceFailed(Exception):
    """The feed function raised (exit 1)."""


def parse_arguments(words: Iterable[str]) -> dict[str, str]:
    """``ARG=VALUE`` words as keyword arguments (strings); ValueError for another word."""
    kwargs: dict[str, str] = {}
    for word in words:
        name, has_value, value = word.partition("=")
        if not has_value or not name.isidentifier():
            raise ValueError(f"bad feed argument {word!r}: expected NAME=VALUE")
        if name == "last":
            raise ValueError("the feed argument 'last' is the cursor, given by the feeder")
        kwargs[name] = value
    return kwargs


@dataclass
class Source:
    """A feed function, imported and checked, with its arguments."""

    spec: str
    function: Callable[..., Any]
    args: list[object]
    kwargs: dict[str, object]

    @classmethod
    def load(cls, spec: str, words: Iterable[str] = ()) -> Source:
        """Import ``module:function`` (literal arguments allowed, as in a
        worker spec) and check it is marked; WorkerSpecError otherwise."""
        module_name, path, args, kwargs = parse_spec(spec)
        kwargs.update(parse_arguments(words))
        if "last" in kwargs:
            raise ValueError("the feed argument 'last' is the cursor, given by the feeder")
        if os.getcwd() not in sys.path:  # a module in the current folder is found, as a worker's is
            sys.path.insert(0, os.getcwd())
        try:
            target: object = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - whatever the module raised: one line
            reason = " ".join(str(exc).split()) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
            raise WorkerSpecError(f"cannot import feed module {module_name!r}: {reason}") from None
        for i, name in enumerate(path):
            try:
                target = getattr(target, name)
            except AttributeError:
                raise WorkerSpecError(f"{'.'.join([module_name, *path[:i]])!r} has no attribute {name!r}") from None
        if not callable(target) or not getattr(target, MARK, False):
            raise WorkerSpecError(f"feed {spec!r} is not a function marked with @redbike.feed.feed_source")
        return cls(spec, target, args, kwargs)

    @property
    def default_name(self) -> str:
        module_name, path, _, _ = parse_spec(self.spec)
        return ".".join([module_name, *path])

    def open(self, cursor: Any) -> tuple[Iterator[Any], int | None]:
        """Call the function from ``cursor``: its items, and how many when it says (len())."""
        try:
            returned = self.function(*self.args, last=cursor, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever the user's function raised: one line
            raise SourceFailed(f"feed {self.spec} raised {one_line(exc)}") from None
        try:
            items = iter(returned)
        except TypeError:
            raise BadItem(f"feed {self.spec} returned {type(returned).__name__}, not an iterable") from None
        try:
            total = len(returned)
        except TypeError:
            total = None
        return items, total


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Fed(NamedTuple):
    """One item, checked: its job's id, data (None: none) and cursor."""

    jobid: str
    data: Any
    cursor: Any


def check_item(item: object, number: int, queue: str | None, queue_of: Callable[[str], str],
               max_data_bytes: int = DEFAULT_MAX_DATA_BYTES) -> Fed:
    """An item as the feed puts it in (BadItem: one line naming it)."""
    where = f"item {number}"
    if isinstance(item, Item):
        jobid, data, cursor = item.jobid, item.data, item.cursor if item.cursor is not None else item.jobid
    elif isinstance(item, str):
        jobid, data, cursor = item, None, item
    elif isinstance(item, tuple) and len(item) == 2:
        jobid, data, cursor = item[0], item[1], item[0]
    else:
        raise BadItem(f"{where}: expected a job id or (job id, data), got {shorten(repr(item))}")
    if not isinstance(jobid, str):
        raise BadItem(f"{where}: the job id {shorten(repr(jobid))} is not a string")
    full = f"{jobid}:{queue}" if queue is not None else jobid
    try:
        check_jobid(full)
        routed = queue_of(full)
    except BadName as exc:
        raise BadItem(f"{where}: {exc}") from None
    if queue is not None and routed != queue:
        raise BadItem(f"{where}: the worker routes {full!r} to queue {routed!r}, not {queue!r}")
    if data is not None:
        try:
            encode_data(data, max_data_bytes)
        except DataError as exc:
            raise BadItem(f"{where} ({jobid}): {exc}") from None
    try:
        json.dumps(cursor, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BadItem(f"{where} ({jobid}): its cursor is not JSON: {exc}") from None
    return Fed(full, data, cursor)


def shorten(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."
