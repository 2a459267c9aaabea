"""A worker pool that tests drive in-process, one call at a time.

In a running pool each slot holds one run at most. A test that holds several
runs at once (claims three jobs, then finishes them in some order) gives
each run a slot of its own, as a pool of that many slots would.
"""

from __future__ import annotations

from redbike.claims import Rotation
from redbike.slots import Running
from redbike.states import Outcome
from redbike.supervisor import WorkerPool

SLOTS = 24  # more than any test holds at once


class ClaimingPool(WorkerPool):
    """A WorkerPool whose claims and finishes a test makes itself."""

    def __init__(self, *args: object, concurrency: int = SLOTS, **kwargs: object) -> None:
        super().__init__(*args, concurrency=concurrency, **kwargs)  # type: ignore[arg-type]

    @property
    def control_seen(self) -> str:
        return self.claims.control_seen

    @control_seen.setter
    def control_seen(self, value: str) -> None:
        self.claims.control_seen = value

    def claim(self, rotation: Rotation, worker_id: str) -> Running | None:
        """Claim one job into a free slot."""
        free = next((i for i in range(self.concurrency) if not self.board.runs(i)), None)
        if free is None:
            raise RuntimeError(f"the test holds {self.concurrency} runs: give its pool more slots")
        return self.claims.slot(free, worker_id).claim(rotation).claimed

    def finish(self, job: Running, outcome: Outcome, trace: str, rotation: Rotation | None,
               worker_id: str) -> tuple[str | None, Running | None]:
        """End ``job``'s run in the slot that holds it (and claim the next there, with a
        rotation); a run ended before (a late, stale finish) in a free slot."""
        slot = next((i for i in range(self.concurrency) if any(r.lease.token == job.lease.token for r in self.board.runs(i))),
                    None)
        if slot is None:
            slot = next(i for i in range(self.concurrency) if not self.board.runs(i))
        settled = self.claims.slot(slot, worker_id).finish(job, outcome, trace, rotation)
        return settled.done, settled.claimed
