"""One dispatcher process for every shard of an installation (``shards = N``).

Each shard is a job space of its own with its own fenced dispatcher lease,
so the process runs one Dispatcher per shard, each in a thread of its own:
it leads the shards whose lease it holds and stands by for the others, so
several dispatcher processes share the shards, and the shards of one that
died are taken over by the others within a lease (dispatcher.LEAD_MS). The
threads share nothing but the process: a shard's dispatcher that waits on
its Redis (another primary, on a cluster) holds up no other shard.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from .api import Redbike
from .dispatcher import POLL_SECONDS, Dispatcher
from .timefile import read_timefile
from .titles import set_title

log = logging.getLogger(__name__)


def dispatchers_of(parts: list[Redbike]) -> list[Dispatcher]:
    """A Dispatcher for each shard's Redbike (its keys, client and timefile)."""
    return [Dispatcher(part.client, part.keys, part.worker.queue_for, timefile=part.timefile, clock=part.clock,
                       retry=part.retry_backoff, retention=part.retention) for part in parts]


def dispatch_shards(parts: list[Redbike]) -> None:
    """Dispatch every shard until HALT (found on any shard: the whole process
    stops, as a HALT is set on every shard at once) or SIGTERM/SIGINT."""
    dispatchers = dispatchers_of(parts)
    stopping = threading.Event()

    def stop(*_: Any) -> None:
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        set_title(f"redbike dispatch ({len(parts)} shards)")
    for dispatcher, part in zip(dispatchers, parts, strict=True):
        recorded = read_timefile(part.timefile)
        if recorded is not None:
            log.info("shard %s: timefile %s records %.0f", part.keys.prefix, part.timefile, recorded)
    threads = [threading.Thread(target=dispatcher.run, name=f"redbike-dispatch-{index}", daemon=True)
               for index, dispatcher in enumerate(dispatchers)]
    for thread in threads:
        thread.start()
    log.info("dispatching %d shards", len(parts))
    # Until a signal or until one shard's dispatcher ends (a HALT): then all stop.
    while not stopping.wait(POLL_SECONDS) and all(thread.is_alive() for thread in threads):
        pass
    for dispatcher in dispatchers:
        dispatcher.stop()
    for thread in threads:
        thread.join()
    log.info("dispatched %d shards: %d moved, %d reaped", len(parts), sum(d.moved for d in dispatchers),
             sum(d.reaped for d in dispatchers))
