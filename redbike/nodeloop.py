"""Who runs reconciliation: once (``redbike nodes --reconcile``), or in a
loop (``--reconcile --loop``, or a thread of the leading dispatcher with
``redbike dispatch --nodes``) that polls each node source on its interval,
passing when a list changed, with standbys waiting for the lease."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import redis

from .api import Redbike
from .config import ConfigError
from .dispatcher import Dispatcher
from .nodeconfig import NodeConfig, load_node_config
from .nodesources import NodeLoader
from .reconcile import Busy, Pass, Reconciler

log = logging.getLogger(__name__)

ORPHAN_PASS = 5.0  # seconds between passes while orphans wait (and no node changed)


def reconcile_once(bike: Redbike, config: NodeConfig, whole: bool = False) -> Pass:
    """Poll every source once and reconcile (Busy if another reconciler runs;
    ``whole``: a whole pass, see Reconciler.reconcile)."""
    reconciler = Reconciler(bike, config)
    if not reconciler.acquire():
        raise Busy(f"another reconciler runs (lease {reconciler.holder()}); try again later")
    try:
        loader = NodeLoader(config, reconciler.stored_nodes())
        loader.poll(bike.clock(), force=True)
        done = reconciler.reconcile(loader.nodes(), whole=whole)
        done.errors[:0] = [f"source {name}: {error}" for name, error in loader.errors().items()]
        return done
    finally:
        reconciler.release()


class ConfigWatch:
    """The node config read again when one of its files changes, or on
    SIGHUP (:meth:`hup`); a config with mistakes is logged and not used."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.stamps = self._stamps()
        self.hupped = False

    def _stamps(self) -> list[float | None]:
        stamps: list[float | None] = []
        for path in self.config.files:
            try:
                stamps.append(os.stat(path).st_mtime)
            except OSError:
                stamps.append(None)
        return stamps

    def hup(self, *_: object) -> None:
        """A signal handler: it only sets a flag."""
        self.hupped = True

    def __call__(self) -> NodeConfig | None:
        """A new config if its files changed (or SIGHUP came) and it is good; else None."""
        stamps = self._stamps()
        if not self.config.files or (stamps == self.stamps and not self.hupped):
            return None
        self.stamps, self.hupped = stamps, False
        try:
            config = load_node_config(self.config.files[0])
        except ConfigError as exc:
            for line in str(exc).splitlines():
                log.error("node config not reloaded: %s", line)
            return None
        if config is None:
            log.error("node config not reloaded: no [redbike-nodes] section in %s", self.config.files[0])
            return None
        log.info("node config reloaded from %s", ", ".join(config.files))
        self.config = config
        return config


def reconcile_loop(bike: Redbike, config: NodeConfig, stop: Callable[[], bool], idle: float = 1.0,
                   leads: Callable[[], bool] = lambda: True,
                   reload: Callable[[], NodeConfig | None] = lambda: None) -> None:
    """Until ``stop()``: stand by for the lease, then poll each source on its
    interval and reconcile when a node list changed or orphans wait for their
    grace to pass. Redis errors are logged and the loop goes on. ``leads``:
    whether this process may reconcile now (a dispatcher's: while it leads);
    while it may not, the loop stands by and gives the lease back. ``reload``
    (a ConfigWatch): a new config, which the next pass follows."""
    reconciler = Reconciler(bike, config)
    loader: NodeLoader | None = None
    dirty = True  # a list changed (or the lease was just taken) since the last whole pass
    last = float("-inf")  # monotonic time of the last pass
    try:
        while not stop():
            try:
                if not leads():
                    if loader is not None:
                        log.info("reconciler %s stands by: its process no longer leads", reconciler.token)
                        reconciler.release()
                    loader, dirty = None, True
                    time.sleep(idle)
                    continue
                if not reconciler.acquire():
                    if loader is not None:
                        log.warning("lost the reconciler lease to %s; standing by", reconciler.holder())
                    loader, dirty = None, True
                    time.sleep(idle)
                    continue
                changed_config = reload()
                if changed_config is not None:
                    reconciler.config, loader = changed_config, None
                if loader is None:
                    log.info("reconciler %s leads", reconciler.token)
                    loader, dirty = NodeLoader(reconciler.config, reconciler.stored_nodes()), True
                dirty = bool(loader.poll(bike.clock())) or dirty
                # Orphans wait for their grace: a pass now and then unsets those past it.
                orphans = time.monotonic() - last >= ORPHAN_PASS and reconciler.client.hlen(reconciler.keys.orphans)
                if dirty or orphans:
                    reconciler.reconcile(loader.nodes())
                    dirty, last = False, time.monotonic()
            except Busy as exc:  # the lease was lost during a slow poll or pass
                log.warning("%s", exc)
            except redis.RedisError as exc:
                log.warning("reconciler: Redis error, trying again: %s", " ".join(str(exc).split()))
            time.sleep(idle)
    finally:
        try:
            reconciler.release()
        except redis.RedisError:
            pass  # the lease expires by itself


def reconcile_beside(dispatcher: Dispatcher, bike: Redbike, config: NodeConfig,
                     reload: Callable[[], NodeConfig | None] = lambda: None) -> threading.Thread:
    """A thread running the loop while ``dispatcher`` leads, until it stops
    (``redbike dispatch --nodes``): a pass shares the dispatcher's process,
    not its loop, so a slow source does not hold due jobs back."""

    def loop() -> None:
        try:
            reconcile_loop(bike, config, stop=dispatcher.stopping.is_set, leads=lambda: dispatcher.token is not None,
                           reload=reload)
        except Exception:  # a bug must not pass silently: the dispatcher goes on without it
            log.exception("the node reconciler stopped")

    thread = threading.Thread(target=loop, name="redbike-reconciler", daemon=True)
    thread.start()
    return thread
