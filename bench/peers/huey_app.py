"""Huey's no-op task (consumer: ``huey_consumer bench.peers.huey_app.huey``)."""

import os

from huey import RedisHuey

from bench.tally import tally

huey = RedisHuey("bench", url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


@huey.task()
def noop(i: int) -> None:
    tally()
