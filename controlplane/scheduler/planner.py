"""One scheduling cycle as a pure function: queued demands × the capacity index → placements,
reservations and "why pending" texts (no I/O; the service loads and commits).

Order of service:
1. Jobs that have waited past `reserve_after_s` (highest priority, then oldest; a bounded
   number per cycle) are placed at once if they fit, else get a reservation on the host
   where they can start soonest (from the running jobs' max durations). Other jobs may
   use a reserved host only if they are sure to end before the reservation starts
   (backfill), so a large job is never starved by a stream of small ones.
2. Then every job, by priority class (higher first); within a class, tenants by weighted
   fair share (lowest key first, re-keyed after every placement), each tenant's jobs
   oldest first. A reservation's holder may use its reserved host.

Capacity only shrinks during a cycle, so a demand that found no host is remembered by
signature and its look-alikes fail at once: a cycle over 100,000 queued jobs of a few
shapes costs about as much as one over the shapes."""

from __future__ import annotations

import heapq
from collections import defaultdict, deque
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from controlplane.scheduler.demand import Demand
from controlplane.scheduler.explain import explain
from controlplane.scheduler.fairshare import FairShare
from controlplane.scheduler.index import CapacityIndex, HostEntry, host_rejection, within_price
from controlplane.scheduler.policies import choose


@dataclass(frozen=True, slots=True)
class PlannerConfig:
    reserve_after_s: float = 300.0
    max_reservations: int = 4
    # New "why pending" texts computed per cycle (each scans every host once).
    max_explanations: int = 32


@dataclass(frozen=True, slots=True)
class Reservation:
    job_id: str
    host_id: str
    class_id: int
    # When enough GPUs of the host are sure to be free (seconds since the epoch).
    start: float


@dataclass(frozen=True, slots=True)
class Placed:
    demand: Demand
    host_id: str
    gpu_uuids: list[str]
    price: int


@dataclass(slots=True)
class Plan:
    placed: list[Placed] = field(default_factory=list)
    reservations: list[Reservation] = field(default_factory=list)
    # job id → why it is still queued (only for jobs explained this cycle).
    reasons: dict[str, str] = field(default_factory=dict)
    decisions: int = 0


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Cycle:
    def __init__(
        self,
        index: CapacityIndex,
        fair: FairShare,
        running: Mapping[str, int],
        now: float,
        config: PlannerConfig,
    ) -> None:
        self.index = index
        self.fair = fair
        self.running: defaultdict[str, int] = defaultdict(int, running)
        self.now = now
        self.config = config
        self.plan = Plan()
        self.reserved: dict[str, Reservation] = {}
        self.failed: set[tuple[object, ...]] = set()
        self.unplaced: list[Demand] = []
        self.placed_early: set[str] = set()

    def usable_for(self, demand: Demand) -> Callable[[HostEntry], bool]:
        ends = self.now + demand.max_duration_s

        def usable(host: HostEntry) -> bool:
            held = self.reserved.get(host.host_id)
            return held is None or held.job_id == demand.job_id or ends <= held.start

        return usable

    def place(self, demand: Demand) -> bool:
        self.plan.decisions += 1
        memo = (demand.signature, demand.max_duration_s)
        if memo in self.failed:
            return False
        if demand.gpu_count and self.index.free_total < demand.gpu_count:
            self.failed.add(memo)
            return False
        choice = choose(self.index, demand, self.usable_for(demand))
        if choice is None:
            if not any(r.job_id == demand.job_id for r in self.reserved.values()):
                self.failed.add(memo)  # a holder's view differs (it may use its host)
            return False
        host, gpu_class = choice
        uuids: list[str] = []
        if gpu_class is not None:
            until = self.now + demand.max_duration_s
            uuids = self.index.take(host.host_id, gpu_class.id, demand.gpu_count, until)
        self.plan.placed.append(Placed(demand, host.host_id, uuids, host.price))
        self.running[demand.tenant_id] += demand.gpu_count
        return True

    def reserve(self, demand: Demand) -> Reservation | None:
        return earliest_start(self.index, demand, self.now, skip=self.reserved)

    def reserve_for_long_waiters(self, queue: Sequence[Demand]) -> None:
        """The oldest jobs (highest priority first; among equals, the tenant with the lowest
        fair-share key) that have waited past `reserve_after_s` are placed now if they fit,
        else get a reservation. A bounded number per cycle (at most one per eight hosts),
        so fair share still decides most placements."""
        limit = min(self.config.max_reservations, max(1, len(self.index.hosts) // 8))
        due = [
            d
            for d in queue
            if d.gpu_count and self.now - d.queued_since >= self.config.reserve_after_s
        ]
        due.sort(
            key=lambda d: (
                -d.priority,
                d.queued_since,
                self.fair.key(d.tenant_id, self.running[d.tenant_id]),
                d.job_id,
            )
        )
        searches = 4 * limit  # each search scans every host: bounded, found or not
        served = 0
        for demand in due:
            if served >= limit or searches == 0:
                break
            if self.place(demand):
                # It fits now: placed ahead of the fair pass, else smaller jobs of lighter
                # tenants would take the GPUs it waited for, cycle after cycle.
                served += 1
                self.placed_early.add(demand.job_id)
                continue
            searches -= 1
            reservation = self.reserve(demand)
            if reservation is None:
                continue
            served += 1
            self.reserved[reservation.host_id] = reservation
            self.plan.reservations.append(reservation)
            self.plan.reasons[demand.job_id] = (
                f"waiting for {demand.gpu_count} GPUs on {reservation.host_id}, reserved for "
                f"this job; expected start by {_when(reservation.start)}"
            )

    def fair_pass(self, queue: Sequence[Demand]) -> None:
        classes: dict[int, dict[str, deque[Demand]]] = defaultdict(lambda: defaultdict(deque))
        for demand in queue:
            if demand.job_id not in self.placed_early:
                classes[demand.priority][demand.tenant_id].append(demand)
        for priority in sorted(classes, reverse=True):
            tenants = classes[priority]
            heap = [(self.fair.key(t, self.running[t]), t) for t in tenants]
            heapq.heapify(heap)
            while heap:
                _, tenant = heapq.heappop(heap)
                jobs = tenants[tenant]
                demand = jobs.popleft()
                if not self.place(demand):
                    self.unplaced.append(demand)
                if jobs:
                    heapq.heappush(heap, (self.fair.key(tenant, self.running[tenant]), tenant))

    def explain_unplaced(self) -> None:
        texts: dict[tuple[object, ...], str] = {}
        for demand in self.unplaced:
            if demand.job_id in self.plan.reasons:
                continue
            text = texts.get(demand.signature)
            if text is None:
                if len(texts) >= self.config.max_explanations:
                    continue
                text = explain(self.index, demand, self.usable_for(demand))
                texts[demand.signature] = text
            self.plan.reasons[demand.job_id] = text


def earliest_start(
    index: CapacityIndex, demand: Demand, now: float, skip: Container[str] = ()
) -> Reservation | None:
    """The host (not in `skip`) where the job can start soonest once running jobs end by
    their max durations; None when no host could ever take it."""
    best: tuple[float, int, str] | None = None
    found: Reservation | None = None
    for host in index.hosts.values():
        if host.host_id in skip or host_rejection(demand, host) is not None:
            continue
        if not within_price(demand, host):
            continue
        for gpu_class in index.fitting_classes(demand):
            missing = demand.gpu_count - len(host.free.get(gpu_class.id, ()))
            busy = sorted(host.busy_until.get(gpu_class.id, ()))
            if missing > len(busy):
                continue
            start = max(now, busy[missing - 1]) if missing > 0 else now
            key = (start, host.price, host.host_id)
            if best is None or key < best:
                best = key
                found = Reservation(demand.job_id, host.host_id, gpu_class.id, start)
    return found


def plan_cycle(
    index: CapacityIndex,
    queue: Sequence[Demand],
    fair: FairShare,
    running: Mapping[str, int],
    now: float,
    config: PlannerConfig | None = None,
) -> Plan:
    """Places what fits of `queue` (given in submit order) on `index`, which it updates.
    `running`: GPUs each tenant holds now (for fair share)."""
    cycle = _Cycle(index, fair, running, now, config or PlannerConfig())
    cycle.reserve_for_long_waiters(queue)
    cycle.fair_pass(queue)
    cycle.explain_unplaced()
    return cycle.plan
