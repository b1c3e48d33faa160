"""The operator's fleet status: the database's counts and this replica's recent scheduler cycles."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from controlplane import gauges
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.scheduler.service import CycleStats

# Cycles kept for the percentiles: at the default interval, the last minute or so.
WINDOW = 200


@dataclass(frozen=True)
class Cycles:
    """The last cycle and the window's percentiles; `last_at` None: none ran here yet."""

    last_at: datetime | None = None
    last: CycleStats | None = None
    p50_seconds: float = 0.0
    p99_seconds: float = 0.0
    count: int = 0


class CycleWindow:
    """The latest `size` scheduler cycles of this replica, and whether it leads (only the
    leader runs cycles). The control plane feeds it from Scheduler.on_cycle and its
    leadership callback; GetFleetStatus reads it."""

    def __init__(self, size: int = WINDOW) -> None:
        self._seconds: deque[float] = deque(maxlen=size)
        self._last: CycleStats | None = None
        self._last_at: datetime | None = None
        self.leading = False

    def observe(self, cycle: CycleStats) -> None:
        self._seconds.append(cycle.seconds)
        self._last, self._last_at = cycle, utcnow()

    def snapshot(self) -> Cycles:
        ordered = sorted(self._seconds)
        return Cycles(
            last_at=self._last_at,
            last=self._last,
            p50_seconds=_rank(ordered, 0.50),
            p99_seconds=_rank(ordered, 0.99),
            count=len(ordered),
        )


def _rank(ordered: list[float], quantile: float) -> float:
    """The nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


@dataclass(frozen=True)
class FleetStatus:
    counts: gauges.FleetCounts
    cycles: Cycles
    leader_here: bool


class Fleet:
    """Reads the fleet's status: counts from the database, cycles from this replica."""

    def __init__(self, db: Database, cycles: CycleWindow) -> None:
        self.db = db
        self.cycles = cycles

    async def status(self) -> FleetStatus:
        counts = await gauges.fleet(self.db)
        return FleetStatus(counts, self.cycles.snapshot(), self.cycles.leading)
