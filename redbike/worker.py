"""The worker pool's public names, from the modules of its process roles:
supervisor.py (the pool's supervisor), slot.py (a slot's child), claims.py
(the claim/finish protocol client)."""

from __future__ import annotations

from .claims import GRACE_SECONDS, LEASE_SECONDS, Rotation
from .slot import run_work
from .supervisor import WorkerPool

__all__ = ["GRACE_SECONDS", "LEASE_SECONDS", "Rotation", "WorkerPool", "run_work"]
