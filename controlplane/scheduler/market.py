"""The market holds are priced on: the capacity index, read without a database round trip on
the submit path (kept at most a few seconds old), and the dearest offer that matches a job."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpuplane.v1 import types_pb2

from controlplane.db.engine import Database
from controlplane.scheduler.capacity import Durations, large_fleet, load_capacity, reusable
from controlplane.scheduler.demand import Demand, Policy, demand_of
from controlplane.scheduler.index import CapacityIndex, HostEntry, could_take
from messaging.tasks import stop_tasks

log = logging.getLogger(__name__)

# A view younger than this is used as it is.
FRESH_SECONDS = 1.0
# A view younger than this is used while a reload runs in the background; an older one (or
# none) is reloaded before it is used.
STALE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class MarketView:
    """One load of the capacity index, with its hosts dearest first."""

    index: CapacityIndex
    # When the load began (the clock of the Market that made it).
    loaded_at: float
    dearest_first: tuple[HostEntry, ...]
    # How long the load took (that clock).
    load_seconds: float = 0.0

    @classmethod
    def of(cls, index: CapacityIndex, loaded_at: float, load_seconds: float = 0.0) -> MarketView:
        hosts = sorted(index.hosts.values(), key=lambda h: (-h.price, h.host_id))
        return cls(index, loaded_at, tuple(hosts), load_seconds)

    @property
    def slow(self) -> bool:
        """Whether it is a large fleet's, slow to read (capacity.large_fleet)."""
        return large_fleet(len(self.index.hosts))

    def reusable(self, now: float) -> bool:
        """Whether it may be used as fresh, and quoted though GPUs changed since, at `now`
        (capacity.reusable): a steady stream of placements, submits and hosts connecting
        cannot keep rereading the whole fleet."""
        return reusable(len(self.index.hosts), self.loaded_at, self.load_seconds, now)

    def dearest_match(self, demand: Demand) -> int | None:
        """The highest price per GPU-hour among the hosts that could take the job (free or
        busy, within its max price), or None when none could. Stops at the first match, so an
        unconstrained job costs one check."""
        classes = self.index.fitting_classes(demand)
        for host in self.dearest_first:
            if could_take(classes, demand, host):
                return host.price
        return None


class Market:
    """The view submits and quotes price against. Neither waits on the database while the
    view is younger than STALE_SECONDS (past FRESH_SECONDS, or past its reuse for a view
    slow to read, it is reloaded in the background),
    except that quotes, which show free GPUs, wait for a view loaded after the last change of
    GPUs this replica made or saw (`touched`: a placement, an attempt's end); another
    replica's such change reaches its quotes within FRESH_SECONDS of the next quote (at most
    STALE_SECONDS when quotes are rare; see MarketView.reusable for fleets whose view is slow to
    read). Submits price holds on hosts and prices only, which GPUs being taken or freed do
    not change."""

    def __init__(
        self,
        db: Database,
        default_policy: int = Policy.PLACEMENT_POLICY_CHEAPEST,
        *,
        fresh_seconds: float = FRESH_SECONDS,
        stale_seconds: float = STALE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.default_policy = default_policy
        self.fresh_seconds = fresh_seconds
        self.stale_seconds = stale_seconds
        self.clock = clock
        self.durations = Durations()
        self._view: MarketView | None = None
        # Bumped by invalidate(): a load begun before it is not kept.
        self._generation = 0
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[MarketView] | None = None
        # When GPUs were last taken or freed here (`touched`).
        self._touched_at = float("-inf")

    async def view(self, *, reload: bool = False) -> MarketView:
        """The current view; `reload` reads the database now."""
        current = self._view
        if current is not None and not reload:
            now = self.clock()
            age = now - current.loaded_at
            if age < self.fresh_seconds or (age < self.stale_seconds and current.reusable(now)):
                return current
            if age < self.stale_seconds:
                self._reload_in_background()
                return current
        return await self._reload(self.clock())

    async def quote_view(self) -> MarketView:
        """The view a quote shows: as `view()`, but loaded after the last `touched`, unless
        loading is slow (MarketView.slow): then a view younger than STALE_SECONDS is shown
        while a newer one loads behind it once it is past its reuse (MarketView.reusable),
        so a quote never waits seconds for a read on a busy fleet."""
        current, now = self._view, self.clock()
        if current is not None and (current.loaded_at > self._touched_at or current.reusable(now)):
            return await self.view()
        if current is not None and current.slow and now - current.loaded_at < self.stale_seconds:
            self._reload_in_background()  # GPUs changed, past its reuse: shown meanwhile
            return current
        return await self._reload(math.nextafter(self._touched_at, math.inf))

    def touched(self) -> None:
        """GPUs were taken or freed here: the next quote reads the database."""
        self._touched_at = self.clock()

    async def dearest_match(self, spec: types_pb2.JobSpec) -> int | None:
        """The highest price among the offers matching `spec` now (see MarketView)."""
        demand = demand_of("", "", spec, 0.0, default_policy=self.default_policy)
        return (await self.view()).dearest_match(demand)

    def invalidate(self) -> None:
        """Forgets the view: the next caller reads the database. A view slow to read that may
        still be reused (MarketView.reusable) is kept: in a fleet of thousands, hosts
        (re)connecting every second would otherwise have submits reread it in turn."""
        current = self._view
        if current is not None and current.reusable(self.clock()):
            return
        self._view = None
        self._generation += 1

    async def close(self) -> None:
        task, self._background = self._background, None
        if task is not None:
            await stop_tasks([task])

    async def _reload(self, wanted_since: float) -> MarketView:
        """A view loaded no earlier than `wanted_since`: concurrent callers share one load."""
        async with self._lock:
            current = self._view
            if current is not None and current.loaded_at >= wanted_since:
                return current
            started, generation = self.clock(), self._generation
            async with self.db.read() as session:
                capacity = await load_capacity(session, self.durations)
            view = MarketView.of(capacity.index, started, self.clock() - started)
            if generation == self._generation:
                self._view = view
            return view

    def _reload_in_background(self) -> None:
        if self._background is not None and not self._background.done():
            return
        self._background = asyncio.create_task(self._reload(self.clock()))
        self._background.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[MarketView]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # The stale view stays in use; the next caller past STALE_SECONDS reloads and raises.
        log.warning("reloading the market view failed: %s", task.exception())
