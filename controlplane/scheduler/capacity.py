"""The capacity snapshot shared by the scheduler and the offers: online hosts, free healthy GPUs."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.registry.repository import RegistryRepository
from controlplane.scheduler.matching import FreeGpu, HostCapacity

# Only these host states take new placements; draining, drained and lost hosts offer nothing.
SCHEDULABLE_HOST_STATES = ("online",)


async def capacity_snapshot(session: AsyncSession) -> list[HostCapacity]:
    """Online hosts with their free healthy GPUs, cheapest first (then by host id)."""
    repo = RegistryRepository(session)
    hosts = await repo.hosts_in_states(SCHEDULABLE_HOST_STATES)
    by_id: dict[str, HostCapacity] = {
        h.id: HostCapacity(
            host_id=h.id,
            price_per_gpu_hour=h.price_per_gpu_hour,
            location=h.location,
            labels={str(k): str(v) for k, v in h.labels.items()},
            simulated=h.simulated,
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
