"""An installation of several shards, as the Python API and the CLI see it.

``ShardedRedbike`` offers Redbike's commands over ``shards = N`` job spaces
(shards.py): a command about one job goes to the job's shard (a pure
function of its id, so nothing is looked up first), one about a resource to
the resource's shard, and the listings merge every shard's. Each shard is
served by a ``Redbike`` of its own (its prefix, its client), so what one
shard does is exactly what an installation without shards does.

Not over shards (refused with one line): the node model, whose scripts
take keys of the whole installation, and `feed --source`. A feed of a
function goes over shards with a transaction per shard (feedshards.py).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from . import overviews
from .api import Needs, Redbike
from .clock import RedisClock
from .jobinput import Queued, read_schedules_csv
from .resources import amounts_of, check_capacity, check_name, read_capacities_csv
from .roundrobin import RoundRobin
from .shards import Shards
from .timefile import check_timefile

log = logging.getLogger(__name__)

class NotOverShards(ValueError):
    """A command that does not work over several shards (one line for the user)."""


def shard_timefile(timefile: str | None, index: int, count: int) -> str | None:
    """Shard ``index``'s timefile: its dispatcher keeps its own (``timefile.k``) once there are several."""
    return timefile if timefile is None or count == 1 else f"{timefile}.{index}"


class ShardedRedbike:
    """One installation over ``shards``: a Redbike per shard, made with the
    same settings (``options``: Redbike's keyword arguments but ``client``,
    ``prefix`` and ``timefile``)."""

    def __init__(self, worker: RoundRobin | None, shards: Shards, timefile: str | None = None,
                 clock: Callable[[], float] | None = None, **options: Any) -> None:
        self.worker = worker if worker is not None else RoundRobin()
        self.shards = shards
        self.timefile = timefile
        # One clock for all (the first shard's server's, unless given): a
        # command that spans shards counts from one now.
        self.clock: Callable[[], float] = clock if clock is not None else RedisClock(shards.clients[0])
        self.parts = [
            Redbike(self.worker, prefix=keys.prefix, client=client, clock=self.clock,
                    timefile=shard_timefile(timefile, index, shards.count), **options)
            for index, (keys, client) in enumerate(zip(shards.keys, shards.clients, strict=True))
        ]
        for part in self.parts:
            part.shard_count = shards.count
        self.default_timeout = self.parts[0].default_timeout
        self.max_data_bytes = self.parts[0].max_data_bytes

    def part(self, name: str) -> Redbike:
        """The Redbike of the shard ``name`` (a job id or a resource) lives on."""
        return self.parts[self.shards.of(name)]

    # -- one job at a time: its shard -----------------------------------------------

    def set(self, jobid: str, schedule: str, after: float | None = None, needs: Needs = None, **options: Any) -> str:
        """Redbike.set on the job's shard (NeedsSpanShards if a need is on another)."""
        return self.part(jobid).set(jobid, schedule, after=after, needs=needs, **options)

    def unset(self, jobid: str) -> int:
        return self.part(jobid).unset(jobid)

    def tell(self, jobid: str) -> dict[str, Any] | None:
        told = self.part(jobid).tell(jobid)
        if told is not None:
            told["shard"] = self.shards.of(jobid)
        return told

    def schedule_of(self, jobid: str) -> str | None:
        return self.part(jobid).schedule_of(jobid)

    def explain(self, jobid: str) -> Any:
        return self.part(jobid).explain(jobid)

    def needs_of(self, jobid: str, needs: Mapping[str, int] | str | None = None) -> dict[str, int]:
        return self.part(jobid).needs_of(jobid, needs)

    # -- many jobs: grouped by shard -------------------------------------------------

    def set_many(self, rows: Iterable[tuple[str, ...]], after: float | None = None) -> list[str]:
        """Redbike.set_many, each shard's rows on its shard (rows keep their order within a shard)."""
        errors = []
        for index, shard_rows in self.shards.group(list(rows), lambda row: row[0]).items():
            errors += self.parts[index].set_many(shard_rows, after=after)
        return errors

    def set_alike(self, jobs: Iterable[tuple[str, Needs] | tuple[str, Needs, Any]], schedule: str,
                  **options: Any) -> dict[str, Any]:
        """Redbike.set_alike, one pipeline per shard."""
        results: dict[str, Any] = {}
        for index, shard_jobs in self.shards.group(list(jobs), lambda job: job[0]).items():
            results.update(self.parts[index].set_alike(shard_jobs, schedule, **options))
        return results

    def queue_alike(self, pipe: Any, jobs: Iterable[Any], schedule: str, **options: Any) -> Queued:
        """Not over shards: a pipeline (a MULTI) is one shard's. Group the
        jobs by shard (``shards.group``) and use each part's queue_alike, as
        the feeder does (feedshards.py)."""
        raise NotOverShards("queue_alike queues on one pipeline, which is one shard's: use parts[k].queue_alike")

    def unset_many(self, jobids: Iterable[str]) -> dict[str, int | Exception]:
        results: dict[str, int | Exception] = {}
        for index, shard_jobids in self.shards.group(list(jobids)).items():
            results.update(self.parts[index].unset_many(shard_jobids))
        return results

    def retry(self, jobids: Iterable[str] = (), status: str | None = None) -> dict[str, str]:
        """Redbike.retry: the given jobs on their shards, or (``status``) the failed jobs of every shard."""
        if status is not None:
            return {jobid: result for part in self.parts for jobid, result in part.retry(status=status).items()}
        results: dict[str, str] = {}
        for index, shard_jobids in self.shards.group(list(jobids)).items():
            results.update(self.parts[index].retry(shard_jobids))
        return results

    # -- resources: the resource's shard ---------------------------------------------

    def set_capacity(self, resource: str, capacity: int | None) -> int:
        """Redbike.set_capacity on the shard the resource lives on (its routing key's)."""
        return self.part(check_name(resource)).set_capacity(resource, check_capacity(capacity))

    def set_capacities(self, capacities: Iterable[tuple[str, int | None]]) -> dict[str, int]:
        pairs = [(check_name(resource), check_capacity(capacity)) for resource, capacity in capacities]
        woken: dict[str, int] = {}
        for index, shard_pairs in self.shards.group(pairs, lambda pair: pair[0]).items():
            woken.update(self.parts[index].set_capacities(shard_pairs))
        return woken

    def load_capacities(self, path: str) -> int:
        rows = read_capacities_csv(path)
        self.set_capacities(rows)
        return len(rows)

    def capacities(self) -> Iterator[tuple[str, int | None, int, int]]:
        """Every shard's resources (a resource lives on one shard)."""
        return itertools.chain.from_iterable(part.capacities() for part in self.parts)

    # -- the whole installation: every shard -----------------------------------------

    def statuses(self, before: float | None = None) -> Iterator[tuple[str, str, int]]:
        return itertools.chain.from_iterable(part.statuses(before) for part in self.parts)

    def schedules(self) -> Iterator[tuple[str, str]]:
        return itertools.chain.from_iterable(part.schedules() for part in self.parts)

    def pause(self, queue: str) -> bool:
        """Pause ``queue`` on every shard; True if it was not paused on one of them."""
        changed = [part.pause(queue) for part in self.parts]  # every shard, not up to the first True
        return any(changed)

    def resume(self, queue: str) -> bool:
        changed = [part.resume(queue) for part in self.parts]
        return any(changed)

    def paused_queues(self) -> list[str]:
        return sorted({queue for part in self.parts for queue in part.paused_queues()})

    def control(self, command: str = "HALT") -> str:
        """HALT on every shard (each shard's processes read their own control key)."""
        values = [part.control(command) for part in self.parts]
        return values[0]

    def overview(self, scan: bool = True) -> dict[str, Any]:
        """Every shard's overview merged into one (overviews.py): what
        Redbike.overview shows, over the whole installation."""
        return overviews.read(self.parts, self.clock(), scan=scan, prefix=self.shards.prefix)

    # -- not over shards -------------------------------------------------------------

    def nodes(self, level: str | None = None) -> Iterator[tuple[str, str, str, int, int]]:
        raise NotOverShards("the node model is not yet supported with shards > 1")

    def node(self, name: str) -> dict[str, Any] | None:
        raise NotOverShards("the node model is not yet supported with shards > 1")

    def reconcile_nodes(self, config: Any, whole: bool = False) -> Any:
        raise NotOverShards("the node model is not yet supported with shards > 1")

    # -- the daemons -----------------------------------------------------------------

    def dispatch(self, schedules_csv: str | None = None, after: float | None = None, nodes: Any = None) -> None:
        """Set a JOBID,SCHEDULE file's jobs on their shards, then lead every
        shard this process can (dispatchers.py) until HALT or a signal."""
        if nodes is not None:
            raise NotOverShards("the node model (dispatch --nodes) is not yet supported with shards > 1")
        for part in self.parts:
            check_timefile(part.timefile)
        if schedules_csv is not None:
            for line in self.set_many(read_schedules_csv(schedules_csv), after=after):
                log.error("%s: %s", schedules_csv, line)
        from .dispatchers import dispatch_shards

        dispatch_shards(self.parts)

    def work(self, concurrency: int = 1, resources: Mapping[str, int] | str | None = None) -> None:
        """A worker pool whose slots claim from every shard (supervisor.py)."""
        from .supervisor import WorkerPool

        part = self.parts[0]
        WorkerPool(part.client, part.keys, self.worker, concurrency=concurrency, default_timeout=part.default_timeout,
                   resources=amounts_of(resources, "resources"), clock=self.clock, retry=part.retry_backoff,
                   retention=part.retention, shards=self.shards).run()

