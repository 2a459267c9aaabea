"""The registry of live processes: each dispatcher and worker pool says who
it is and what it runs in a key of its own that expires.

A process writes its entry (``keys.process(identity)``: JSON, SET with EX)
when it starts, again when what it shows changed (a slot took or ended a
job, the dispatcher took or lost the lead; at most once a MIN_GAP_SECONDS),
and otherwise every REFRESH_SECONDS, from a loop it runs anyway (the pool's
heartbeat, the dispatcher's loop). A clean stop deletes it; a process that
died leaves it to expire, TTL_SECONDS after its last write. An idle process
so costs one SET every REFRESH_SECONDS: the registry is read by SCAN (the
keyspace holds few keys besides the queues: jobs live in hashes), so no
index needs keeping up to date beside the entries.

The entry is Python's alone (no script reads it), so its format lives here.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast

import redis

from .keys import Keys
from .slots import SlotBoard

REFRESH_SECONDS = 10.0  # an unchanged entry is written again this often
TTL_SECONDS = 30.0  # and expires this long after its last write: a dead process is gone within 3 refreshes
MIN_GAP_SECONDS = 1.0  # a changed entry is written at most this often (a busy pool changes it per job)
READ_BATCH = 500  # entries read per MGET


def redbike_version() -> str:
    try:
        return version("redbike")
    except PackageNotFoundError:
        return "unknown"


def slot_runs(board: SlotBoard, shards: bool = False) -> list[dict[str, Any]]:
    """What each slot of a pool runs, as the registry shows it: the job,
    its lease token, queue and since when (``shards``: and its shard); an
    idle slot has no job."""
    shown: list[dict[str, Any]] = []
    for index in range(board.slots):
        runs = board.runs(index)
        if not runs:
            shown.append({"slot": index})
        for run in runs:
            lease = run.lease
            shown.append({"slot": index, "jobid": lease.jobid, "token": lease.token, "queue": lease.queue,
                          "since": lease.since, "worker": lease.worker})
            if shards:
                shown[-1]["shard"] = run.shard
    return shown


class Registration:
    """One process's entry: what does not change, given once, and what does,
    given to each :meth:`refresh` (called often: it writes only when due)."""

    def __init__(self, client: redis.Redis, keys: Keys, role: str, identity: str, *, clock: Callable[[], float],
                 queues: Iterable[str] = (), slots: int = 0, resources: dict[str, int] | None = None,
                 refresh_seconds: float = REFRESH_SECONDS) -> None:
        self.client = client
        self.key = keys.process(identity)
        self.clock = clock
        self.refresh_seconds = refresh_seconds
        self.ttl = max(1, round(refresh_seconds * TTL_SECONDS / REFRESH_SECONDS))
        self.fixed: dict[str, Any] = {
            "role": role, "identity": identity, "host": socket.gethostname(), "pid": os.getpid(),
            "version": redbike_version(), "started": clock(), "queues": list(queues), "slots": slots,
            "resources": dict(resources or {}), "refresh_seconds": refresh_seconds,
        }
        self.shown: dict[str, Any] | None = None  # what the last write said (refreshed left out)
        self.written_at = float("-inf")

    def refresh(self, **changing: Any) -> bool:
        """Write the entry if what it shows changed (at most once a
        MIN_GAP_SECONDS) or REFRESH_SECONDS passed. Returns whether it wrote."""
        now = self.clock()
        shown = {**self.fixed, **changing}
        since = now - self.written_at
        if not (since >= self.refresh_seconds or (shown != self.shown and since >= MIN_GAP_SECONDS)):
            return False
        self.client.set(self.key, json.dumps({**shown, "refreshed": now}), ex=self.ttl)
        self.shown, self.written_at = shown, now
        return True

    def remove(self) -> None:
        """A clean stop: the entry goes at once."""
        self.client.delete(self.key)
        self.shown, self.written_at = None, float("-inf")


def live(client: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """Every entry in the registry (unreadable ones left out), sorted by
    role, host and pid."""
    names = list(client.scan_iter(match=keys.process_pattern(), count=1000))
    entries = []
    for at in range(0, len(names), READ_BATCH):
        for value in cast("list[str | None]", client.mget(names[at : at + READ_BATCH])):
            try:
                entry = json.loads(value) if value else None
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("role"), str):
                entries.append(entry)
    return sorted(entries, key=lambda e: (e["role"], str(e.get("host")), str(e.get("pid")), str(e.get("identity"))))


def leader_of(token: str | None) -> str | None:
    """The identity of the dispatcher holding the fencing ``token``
    (``epoch:identity``, see lead.lua), or None."""
    return token.partition(":")[2] or None if token else None
