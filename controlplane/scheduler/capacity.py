"""Capacity read from the database: the snapshot offers list, and the index the scheduler and
quotes decide on (online hosts, healthy GPUs, free or busy until their attempt must end)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from gpuplane.v1 import types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.registry.repository import RegistryRepository
from controlplane.scheduler.index import CapacityIndex, HostEntry
from controlplane.scheduler.matching import FreeGpu, HostCapacity
from controlplane.scheduler.repository import SchedulerRepository

# Only these host states take new placements; draining, drained and lost hosts offer nothing.
SCHEDULABLE_HOST_STATES = ("online",)
# A capacity read is done again for every use while the fleet is small. Once it has
# REUSE_MIN_HOSTS schedulable hosts or more (a read then takes tens of milliseconds, ~150 ms at
# 4,000 hosts), what a read found is kept until it is REUSE_FACTOR read-times old, so reading
# costs at most about a tenth of the reader's time whatever the fleet's size: the scheduler's
# index between cycles (service.py) and the market view quotes and submits use (market.py).
# The fleet's size decides, not the read's time: a busy machine stretches a small fleet's read
# past any time bound, and a small fleet must see every change at once.
REUSE_MIN_HOSTS = 1000
REUSE_FACTOR = 10.0


def large_fleet(hosts: int) -> bool:
    """Whether a read of `hosts` schedulable hosts is worth keeping (REUSE_MIN_HOSTS)."""
    return hosts >= REUSE_MIN_HOSTS


def reusable(hosts: int, loaded_at: float, load_seconds: float, now: float) -> bool:
    """Whether what a read of `hosts` hosts begun at `loaded_at` (taking `load_seconds`) found
    may still be used at `now` without reading again (REUSE_MIN_HOSTS, REUSE_FACTOR)."""
    return large_fleet(hosts) and now - loaded_at < REUSE_FACTOR * load_seconds


async def capacity_snapshot(session: AsyncSession) -> list[HostCapacity]:
    """Online hosts with their free healthy GPUs, cheapest first (then by host id)."""
    repo = RegistryRepository(session)
    hosts = await repo.hosts_in_states(SCHEDULABLE_HOST_STATES)
    await repo.score(hosts, utcnow())
    by_id: dict[str, HostCapacity] = {
        h.id: HostCapacity(
            host_id=h.id,
            price_per_gpu_hour=h.price_per_gpu_hour,
            location=h.location,
            labels={str(k): str(v) for k, v in h.labels.items()},
            simulated=h.simulated,
            verified=h.verified_at is not None,
            reliability_permille=h.reliability_permille,
        )
        for h in hosts
    }
    for gpu in await repo.gpus_of(list(by_id)):
        capacity = by_id[gpu.host_id]
        if not gpu.healthy:
            continue
        capacity.total_gpus += 1
        if gpu.job_id is None:
            capacity.free.append(
                FreeGpu(gpu.uuid, gpu.name, gpu.memory_total_bytes, gpu.compute_capability)
            )
    return list(by_id.values())


def epoch(value: datetime) -> float:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class Durations:
    """max_duration of jobs holding GPUs, read once per job (specs are immutable); bounded."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self.seconds: dict[str, float] = {}

    def remember(self, job_id: str, seconds: float) -> None:
        if len(self.seconds) >= self.limit:
            self.seconds.clear()  # rare: re-read what is still running on the next load
        self.seconds[job_id] = seconds

    async def fill(self, repo: SchedulerRepository, job_ids: set[str]) -> None:
        missing = [j for j in job_ids if j not in self.seconds]
        for job_id, spec in (await repo.specs(missing)).items():
            self.remember(job_id, float(types_pb2.JobSpec.FromString(spec).max_duration_seconds))


@dataclass(slots=True)
class Capacity:
    index: CapacityIndex
    # GPUs each tenant's live attempts hold.
    running: dict[str, int]


async def load_capacity(session: AsyncSession, durations: Durations) -> Capacity:
    """The capacity index of online hosts' healthy GPUs: free ones, and busy ones with the
    time their attempt must end by (start + max_duration), for reservations."""
    repo = SchedulerRepository(session)
    index = CapacityIndex()
    entries: dict[str, HostEntry] = {}
    hosts = await repo.hosts(SCHEDULABLE_HOST_STATES)
    book = await RegistryRepository(session).provider_book(
        (h.provider_tenant_id for h in hosts), utcnow()
    )
    for h in hosts:
        entries[h.id] = HostEntry(
            h.id,
            h.price_per_gpu_hour,
            h.location,
            {str(k): str(v) for k, v in (h.labels or {}).items()},
            h.simulated,
            book.host_permille(h),
            verified=h.verified_at is not None,
            self_service=h.self_service,
        )
    live = await repo.live_attempts()
    await durations.fill(repo, {row.job_id for row in live})
    running: dict[str, int] = {}
    ends: dict[str, float] = {}
    for row in live:
        running[row.tenant_id] = running.get(row.tenant_id, 0) + len(row.gpu_uuids or [])
        until = epoch(row.since) + durations.seconds.get(row.job_id, 0.0)
        for uuid in row.gpu_uuids or []:
            ends[uuid] = until
    for group in await repo.gpu_groups(SCHEDULABLE_HOST_STATES):
        entry = entries.get(group.host_id)
        if entry is None:
            continue
        gpu_class = index.gpu_class(group.name, group.memory_total_bytes, group.compute_capability)
        if group.free:
            entry.free.setdefault(gpu_class.id, []).extend(group.free)
        if group.busy:
            busy = entry.busy_until.setdefault(gpu_class.id, [])
            busy.extend(ends.get(uuid, 0.0) for uuid in group.busy)
    for entry in entries.values():
        index.add_host(entry)
    return Capacity(index, running)


async def load_registered(session: AsyncSession) -> CapacityIndex:
    """Every registered, non-revoked host in any state with all its GPUs as if free and
    healthy: what could ever run a job (scheduler/feasibility.py)."""
    repo = SchedulerRepository(session)
    index = CapacityIndex()
    entries = {
        h.id: HostEntry(
            h.id,
            h.price_per_gpu_hour,
            h.location,
            {str(k): str(v) for k, v in (h.labels or {}).items()},
            h.simulated,
            # Could ever: a host not verified yet may pass its probe; a simulated one never.
            verified=not h.simulated,
        )
        for h in await repo.registered_hosts()
    }
    for gpu in await repo.registered_gpus():
        entry = entries.get(gpu.host_id)
        if entry is not None:
            gpu_class = index.gpu_class(gpu.name, gpu.memory_total_bytes, gpu.compute_capability)
            entry.free.setdefault(gpu_class.id, []).append(gpu.uuid)
    for entry in entries.values():
        index.add_host(entry)
    return index
