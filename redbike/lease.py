"""A lease on one key: at most one holder of a role at a time (the node
reconciler, a feeder), with its writes fenced.

The key holds the holder's token and expires (SET NX PX); the holder renews
it, and writes only in a transaction that WATCHes the key and finds its own
token there (:meth:`KeyLease.if_mine`), so a holder that stalled past its
lease, whose key another took meanwhile, changes nothing: its EXEC fails.
(The dispatcher's lease, lead.lua, is checked inside its scripts instead:
they run on every step, and a Lua check costs no round trip.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import redis


def new_token() -> str:
    """A holder's token: ``host:pid:nonce`` (the nonce tells apart two holders of one pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class KeyLease:
    """The lease ``key`` held with ``token`` for ``ms`` milliseconds at a time."""

    def __init__(self, client: redis.Redis, key: str, ms: int, token: str | None = None) -> None:
        self.client = client
        self.key = key
        self.ms = ms
        self.token = token or new_token()

    def acquire(self) -> bool:
        """Take the lease, or renew it if it is ours; False if another holds it."""
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ms)) or \
            self.if_mine(lambda pipe: pipe.pexpire(self.key, self.ms))

    def release(self) -> None:
        self.if_mine(lambda pipe: pipe.delete(self.key))

    def break_if(self, holder: str) -> None:
        """Delete the lease if ``holder`` still holds it (a holder known to be
        gone: its writes, were it not, would fail their WATCH)."""
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(self.key)
                if pipe.get(self.key) == holder:
                    pipe.multi()
                    pipe.delete(self.key)
                    pipe.execute()
            except redis.WatchError:
                pass

    def holder(self) -> str | None:
        holder: str | None = self.client.get(self.key)  # type: ignore[assignment]
        return holder

    def expires_in(self) -> float:
        """Seconds until the lease's key expires (0 if there is none)."""
        left = self.client.pttl(self.key)
        return max(0, int(left)) / 1000

    def if_mine(self, act: Callable[[Any], object]) -> Any:
        """Run ``act(pipe)`` (commands queued on a MULTI pipeline) in one
        transaction if the lease is still ours, renewing it in the same
        transaction: the replies of EXEC (a true list) if it ran, else
        False (another holds the lease, or took it while we looked)."""
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(self.key)
                if pipe.get(self.key) != self.token:
                    return False
                pipe.multi()
                act(pipe)
                pipe.pexpire(self.key, self.ms)
                return pipe.execute(raise_on_error=False) or [None]
            except redis.WatchError:
                return False
