"""Turning a worker spec string into a worker object.

A spec names a subclass of :class:`redbike.RoundRobin` in an importable module
and, optionally, literal constructor arguments::

    examples.worker:Echo
    examples.worker:Echo('A:A:B')
    mymodule:Outer.Work('A:B', 3, name="x")

The part after the module is parsed with :mod:`ast` and only literals
(strings, numbers, tuples, lists, dicts, sets, booleans, None) are accepted as
arguments: the spec comes from a command line or a config file and is never
evaluated.  The name must resolve to a class deriving from ``RoundRobin``; it
is checked before anything is called, so a spec such as ``os:system('...')``
or ``builtins:exec('...')`` is refused without running anything.
"""

from __future__ import annotations

import ast
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeGuard

from .roundrobin import RoundRobin

logger = logging.getLogger(__name__)


class WorkerSpecError(Exception):
    """The worker spec is invalid or the worker cannot be created; one-line message."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _dotted_name(node: ast.expr, spec: str) -> list[str]:
    """``A.B.C`` as ``['A', 'B', 'C']``; anything but names and attributes is refused."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise WorkerSpecError(
            f"invalid worker spec {spec!r}: expected a class name after ':', "
            f"got {ast.unparse(node)!r}"
        )
    parts.append(node.id)
    return parts[::-1]


def _literal(node: ast.expr, spec: str) -> object:
    if isinstance(node, ast.Starred):
        raise WorkerSpecError(f"invalid worker spec {spec!r}: *args are not allowed")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise WorkerSpecError(
            f"invalid worker spec {spec!r}: argument {ast.unparse(node)!r} is not a literal"
        ) from None


def parse_spec(spec: str) -> tuple[str, list[str], list[object], dict[str, object]]:
    """Split ``spec`` into module name, attribute path, args and kwargs without importing."""
    module, sep, rest = spec.strip().partition(":")
    # Split at the first ':' only: the init string may contain colons itself.
    if not sep or not module or not all(p.isidentifier() for p in module.split(".")):
        raise WorkerSpecError(
            f"invalid worker spec {spec!r}: expected 'package.module:ClassName' "
            "or 'package.module:ClassName(args)'"
        )
    try:
        tree = ast.parse(rest.strip(), mode="eval")
    except SyntaxError as exc:
        raise WorkerSpecError(f"invalid worker spec {spec!r}: {exc.msg}") from None
    body = tree.body
    if not isinstance(body, ast.Call):
        return module, _dotted_name(body, spec), [], {}
    path = _dotted_name(body.func, spec)
    args = [_literal(arg, spec) for arg in body.args]
    kwargs: dict[str, object] = {}
    for keyword in body.keywords:
        if keyword.arg is None:
            raise WorkerSpecError(f"invalid worker spec {spec!r}: **kwargs are not allowed")
        kwargs[keyword.arg] = _literal(keyword.value, spec)
    return module, path, args, kwargs


def _is_worker_class(target: object) -> TypeGuard[type[RoundRobin]]:
    try:
        return isinstance(target, type) and issubclass(target, RoundRobin)
    except TypeError:  # a generic alias passes isinstance(..., type) on some Pythons
        return False


def load_worker(spec: str) -> RoundRobin:
    """Import the module named in ``spec`` and return the constructed worker."""
    module_name, path, args, kwargs = parse_spec(spec)
    # So that `redbike work mymodule:Work(...)` finds mymodule.py in the
    # current directory even when redbike runs as an installed script.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:
        # An ImportError's message says it all ("No module named 'foo'");
        # for anything else raised by the module the type is part of the story.
        reason = " ".join(str(exc).split()) if isinstance(exc, ImportError) else _one_line(exc)
        raise WorkerSpecError(f"cannot import worker module {module_name!r}: {reason}") from exc
    for i, name in enumerate(path):
        try:
            target = getattr(target, name)
        except AttributeError:
            owner = ".".join([module_name, *path[:i]])
            raise WorkerSpecError(f"{owner!r} has no attribute {name!r}") from None
    qualname = f"{module_name}:{'.'.join(path)}"
    # Checked before the call: a spec may name any attribute of any module
    # (os:system, builtins:exec, sys:exit), and only a worker class may run.
    if not _is_worker_class(target):
        raise WorkerSpecError(f"worker {qualname!r} is not a class deriving from redbike.RoundRobin")
    # A subclass's __init__ takes whatever it declares, not RoundRobin's.
    construct: Callable[..., object] = target
    try:
        worker = construct(*args, **kwargs)
    except Exception as exc:
        raise WorkerSpecError(f"cannot create worker {qualname!r}: {_one_line(exc)}") from exc
    if not isinstance(worker, RoundRobin):  # a __new__ may return anything
        raise WorkerSpecError(f"worker {qualname!r} did not create a redbike.RoundRobin")
    logger.debug("loaded worker %s from spec %r", type(worker).__name__, spec)
    return worker
