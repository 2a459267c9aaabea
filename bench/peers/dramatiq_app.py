"""Dramatiq's no-op actor (worker: ``dramatiq bench.peers.dramatiq_app --processes 1``)."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.tally import tally

dramatiq.set_broker(RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")))


@dramatiq.actor
def noop(i: int) -> None:
    tally()
