"""redbike: a cron-style job dispatcher and worker pool on Redis."""

from .api import Redbike
from .roundrobin import Lease, RoundRobin, StopWork, UnsetJob
from .schedules import ScheduleError

__all__ = ["Lease", "Redbike", "RoundRobin", "ScheduleError", "StopWork", "UnsetJob"]
