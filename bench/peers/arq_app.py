"""arq's no-op job. ``python -m bench.peers.arq_app`` runs one worker with
arq's defaults (what ``arq bench.peers.arq_app.WorkerSettings`` runs), but
logging at WARNING like every other system here (arq's CLI logs every job at INFO)."""

import logging
import os
from typing import Any, ClassVar

from arq import run_worker
from arq.connections import RedisSettings

from bench.tally import tally


async def noop(ctx: dict, i: int) -> None:
    tally()


class WorkerSettings:
    functions: ClassVar[list[Any]] = [noop]  # arq reads its settings from class attributes
    redis_settings = RedisSettings.from_dsn(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)
