"""Resources: named capacities that gate which job a worker may claim.

A job needs amounts of resources (``host:db-host-17``, ``db:db42=1``); a claim
takes all of them or none, atomically, in claim.lua. A resource with no
capacity set is unlimited. Names that start with ``worker:`` are local to one
worker pool (``redbike work --resources cpu_cores=16``): the pool counts them
itself and tells each claim how much it has free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .csvfile import read_rows
from .names import CONTROL
from .records import encode_needs

LOCAL_PREFIX = "worker:"
# Bounds that keep every sum Redis and Lua compute exact (lib.lua has both).
MAX_AMOUNT = 10**9  # most of a resource one job may need (or a pool may have)
MAX_CAPACITY = 10**12  # largest capacity of a global resource
format_amounts = encode_needs  # the stored needs text (records.py)
# Matched whole (fullmatch: "$" would also match before a trailing newline);
# no whitespace, nor the separators of stored needs; control characters are
# refused as lib.lua's is_resource() refuses them.
_NAME = re.compile(r"[^\s|,=]+")


class ResourceError(ValueError):
    """Bad resource names, amounts or capacities (one line for the user)."""


def _amount(text: str, what: str, allow_zero: bool, most: int = MAX_AMOUNT) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ResourceError(f"bad {what} {text!r}: not a whole number") from None
    return _bounded(value, what, allow_zero, most)


def _bounded(value: int, what: str, allow_zero: bool, most: int) -> int:
    if value < 0 or (value == 0 and not allow_zero):
        raise ResourceError(f"bad {what} {value!r}: must be {'>= 0' if allow_zero else '> 0'}")
    if value > most:
        raise ResourceError(f"bad {what} {value!r}: at most {most:_}")
    return value


def check_capacity(capacity: int | None) -> int | None:
    """A capacity: a whole number in [0, MAX_CAPACITY], or None (unlimited)."""
    if capacity is None:
        return None
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise ResourceError(f"bad capacity {capacity!r}: not a whole number")
    return _bounded(capacity, "capacity", True, MAX_CAPACITY)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or CONTROL.search(name):
        raise ResourceError(f"bad resource name {name!r}: no spaces, control characters, '|', ',' or '='")
    return name


def parse_amounts(text: str, what: str = "needs") -> dict[str, int]:
    """``"host:a,db:b=2"`` -> ``{"host:a": 1, "db:b": 2}`` (amount 1 by default)."""
    amounts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, has_amount, amount = part.partition("=")
        total = amounts.get(name, 0) + (_amount(amount, f"amount in {what}", allow_zero=False) if has_amount else 1)
        amounts[check_name(name)] = _bounded(total, f"amount of {name} in {what}", False, MAX_AMOUNT)
    return amounts


def amounts_of(value: Mapping[str, int] | str | None, what: str = "needs") -> dict[str, int]:
    """Amounts from a mapping, a "name=amount,..." string, or None (none)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_amounts(value, what)
    amounts = {}
    for name, amount in value.items():
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise ResourceError(f"bad amount {amount!r} of {name} in {what}: not a whole number")
        amounts[check_name(name)] = _bounded(amount, f"amount of {name} in {what}", False, MAX_AMOUNT)
    return amounts


def parse_capacity(text: str) -> int | None:
    """A capacity: a whole number >= 0 (0 pauses), or 'none' for unlimited."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    return _amount(text.strip(), "capacity", allow_zero=True, most=MAX_CAPACITY)


def read_capacities_csv(path: str) -> list[tuple[str, int | None]]:
    """All (resource, capacity) rows of a CSV file, checked before any is set."""
    pairs = []
    for number, (name, capacity) in read_rows(path, "RESOURCE,CAPACITY"):
        try:
            pairs.append((check_name(name), parse_capacity(capacity)))
        except ResourceError as exc:
            raise ResourceError(f"{path}:{number}: {exc}") from None
    return pairs
