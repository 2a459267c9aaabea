"""RQ's no-op job (workers: ``rq worker -w rq.worker.SimpleWorker`` or the default forking ``rq.worker.Worker``)."""

from bench.tally import tally


def noop(i: int) -> None:
    tally()
