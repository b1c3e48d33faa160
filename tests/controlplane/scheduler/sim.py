"""A simulated marketplace for the pure scheduler: hosts and GPUs as the ground truth, jobs that
run for a known time, and a clock; each cycle rebuilds the capacity index from the truth
(as the service does from the database) and applies the plan, checking every placement."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from controlplane.scheduler.demand import Demand
from controlplane.scheduler.fairshare import FairShare, FairShareConfig
from controlplane.scheduler.index import CapacityIndex, HostEntry
from controlplane.scheduler.planner import Plan, PlannerConfig, plan_cycle

GIB = 1 << 30


@dataclass
class SimGpu:
    uuid: str
    name: str
    memory: int
    cc: str
    healthy: bool = True
    job: str | None = None


@dataclass
class SimHost:
    host_id: str
    price: int
    location: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    simulated: bool = False
    reliability: int = 1000
    gpus: list[SimGpu] = field(default_factory=list)


@dataclass
class Running:
    demand: Demand
    host_id: str
    uuids: list[str]
    started: float
    ends: float  # when it really ends (≤ started + max_duration)


def demand(
    job_id: str,
    tenant: str = "t1",
    gpus: int = 1,
    *,
    models: tuple[str, ...] = (),
    min_vram_gib: int = 0,
    min_cc: tuple[int, int] = (0, 0),
    max_price: int = 0,
    locations: frozenset[str] = frozenset(),
    labels: tuple[tuple[str, str], ...] = (),
    exclude: frozenset[str] = frozenset(),
    allow_simulated: bool = False,
    policy: int = 1,
    max_duration: float = 3600.0,
    priority: int = 0,
    queued_since: float = 1_000_000.0,
) -> Demand:
    return Demand(
        job_id, tenant, priority, gpus, models, min_vram_gib * GIB, min_cc, max_price,
        locations, labels, exclude, allow_simulated, policy, max_duration, queued_since,
    )  # fmt: skip


def host_of(
    host_id: str, price: int, count: int, model: tuple[str, int, str], **kw: object
) -> SimHost:
    name, memory, cc = model
    gpus = [SimGpu(f"{host_id}-gpu{i}", name, memory, cc) for i in range(count)]
    return SimHost(host_id, price, gpus=gpus, **kw)  # type: ignore[arg-type]


H100 = ("NVIDIA H100 80GB HBM3", 80 * GIB, "9.0")
A100 = ("NVIDIA A100-SXM4-40GB", 40 * GIB, "8.0")
L4 = ("NVIDIA L4", 24 * GIB, "8.9")


class Market:
    def __init__(
        self,
        hosts: list[SimHost],
        fair: FairShareConfig | None = None,
        config: PlannerConfig | None = None,
        now: float = 1_000_000.0,
    ) -> None:
        self.hosts = {h.host_id: h for h in hosts}
        self.now = now
        self.queue: list[Demand] = []
        self.running: dict[str, Running] = {}
        self.fair = FairShare(fair)
        self.config = config or PlannerConfig()
        self.gpu_seconds: defaultdict[str, float] = defaultdict(float)
        self.started_at: dict[str, float] = {}
        self.placements: list[tuple[Demand, str, list[str]]] = []
        self.last_plan = Plan()
        self.run_for: dict[str, float] = {}
        self.fair.advance(now, {})

    def submit(self, demand: Demand, runs_for: float | None = None) -> None:
        self.queue.append(demand)
        self.run_for[demand.job_id] = demand.max_duration_s if runs_for is None else runs_for

    def index(self) -> CapacityIndex:
        index = CapacityIndex()
        ends = {
            uuid: r.started + r.demand.max_duration_s
            for r in self.running.values()
            for uuid in r.uuids
        }
        for host in self.hosts.values():
            entry = HostEntry(
                host.host_id, host.price, host.location, dict(host.labels), host.simulated,
                host.reliability, verified=not host.simulated,
            )  # fmt: skip
            for gpu in host.gpus:
                if not gpu.healthy:
                    continue
                gpu_class = index.gpu_class(gpu.name, gpu.memory, gpu.cc)
                if gpu.job is None:
                    entry.free.setdefault(gpu_class.id, []).append(gpu.uuid)
                else:
                    entry.busy_until.setdefault(gpu_class.id, []).append(ends[gpu.uuid])
            index.add_host(entry)
        return index

    def running_gpus(self) -> dict[str, int]:
        counts: defaultdict[str, int] = defaultdict(int)
        for r in self.running.values():
            counts[r.demand.tenant_id] += len(r.uuids)
        return dict(counts)

    def finish(self, job_id: str) -> None:
        run = self.running.pop(job_id)
        host = self.hosts[run.host_id]
        for gpu in host.gpus:
            if gpu.uuid in run.uuids:
                assert gpu.job == job_id
                gpu.job = None

    def cycle(self) -> Plan:
        index = self.index()
        plan = plan_cycle(index, self.queue, self.fair, self.running_gpus(), self.now, self.config)
        placed = set()
        for p in plan.placed:
            host = self.hosts[p.host_id]
            by_uuid = {g.uuid: g for g in host.gpus}
            for uuid in p.gpu_uuids:
                gpu = by_uuid[uuid]  # a GPU of another host would raise here
                assert gpu.job is None, f"{uuid} given to {p.demand.job_id} while {gpu.job} runs"
                assert gpu.healthy
                gpu.job = p.demand.job_id
            ends = self.now + self.run_for[p.demand.job_id]
            self.running[p.demand.job_id] = Running(
                p.demand, p.host_id, p.gpu_uuids, self.now, ends
            )
            self.started_at[p.demand.job_id] = self.now
            self.placements.append((p.demand, p.host_id, p.gpu_uuids))
            placed.add(p.demand.job_id)
        self.queue = [d for d in self.queue if d.job_id not in placed]
        self.last_plan = plan
        return plan

    def advance(self, seconds: float) -> None:
        """Moves the clock, ending jobs whose run time is up and accounting GPU time."""
        end = self.now + seconds
        while True:
            due = sorted((r.ends, j) for j, r in self.running.items() if r.ends <= end)
            step_to = due[0][0] if due else end
            self._account(step_to)
            if not due:
                break
            self.finish(due[0][1])
        self.now = end

    def _account(self, until: float) -> None:
        elapsed = until - self.now
        if elapsed <= 0:
            return
        for r in self.running.values():
            self.gpu_seconds[r.demand.tenant_id] += len(r.uuids) * elapsed
        self.fair.advance(until, self.running_gpus())
        self.now = until
