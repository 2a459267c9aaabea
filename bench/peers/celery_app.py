"""Celery's no-op task (worker: ``celery -A bench.peers.celery_app worker -P solo``)."""

import os

from celery import Celery

from bench.tally import tally

app = Celery("bench", broker=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True


@app.task
def noop(i: int) -> None:
    tally()
