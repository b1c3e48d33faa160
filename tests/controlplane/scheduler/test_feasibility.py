"""What "no registered host could ever run it" counts: every non-revoked host in any state
with all its GPUs, healthy or not, as if idle; price only when asked (a retry's choice)."""

from __future__ import annotations

from typing import Any

import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2
from sqlalchemy import update

from controlplane.registry.models import Gpu
from controlplane.scheduler.capacity import load_registered
from controlplane.scheduler.demand import Demand, demand_of
from controlplane.scheduler.feasibility import could_run, never_reason, why_never
from controlplane.scheduler.index import CapacityIndex, HostEntry
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

GIB = 1 << 30


def demand(**spec: Any) -> Demand:
    return demand_of("job-1", "tenant-1", types_pb2.JobSpec(**spec), 0.0)


def market() -> CapacityIndex:
    index = CapacityIndex()
    a100 = index.gpu_class("NVIDIA A100-SXM4-80GB", 80 * GIB, "8.0")
    h100 = index.gpu_class("NVIDIA H100 80GB HBM3", 80 * GIB, "9.0")
    cheap = HostEntry("cheap", 1_000_000, "eu", {"tier": "a"}, False, verified=True)
    cheap.free[a100.id] = ["a-0", "a-1"]
    dear = HostEntry("dear", 5_000_000, "us", {}, False, verified=True)
    dear.free[h100.id] = ["h-0"]
    dear.busy_until[h100.id] = [1e12]  # busy GPUs count: the host is not busy forever
    index.add_host(cheap)
    index.add_host(dear)
    return index


def test_hardware_and_host_selectors_decide_price_only_when_asked() -> None:
    index = market()
    assert could_run(index, demand(gpu_count=2, gpu_models=["h100"]))
    assert not could_run(index, demand(gpu_count=3))
    over_price = demand(gpu_count=2, gpu_models=["h100"], max_price_per_gpu_hour_micro_credits=2)
    assert could_run(index, over_price)
    assert not could_run(index, over_price, priced=True)
    assert not could_run(index, demand(gpu_count=1, gpu_models=["B300"]))
    dear = index.hosts["dear"]
    assert never_reason(index, demand(gpu_count=1, locations=["eu"]), dear) == "location"
    assert never_reason(index, demand(gpu_count=1, exclude_host_ids=["dear"]), dear) == "excluded"
    assert never_reason(index, demand(gpu_count=1, min_compute_capability="9.0"), dear) == ""
    assert why_never(index, demand(gpu_count=1, gpu_models=["B300"])) == (
        "no registered host could ever run 1×B300: "
        "2 have no GPU of an allowed model/VRAM/compute capability"
    )
    assert could_run(index, demand(gpu_count=2, host_labels={"tier": "a"}))
    assert why_never(index, demand(gpu_count=3, host_labels={"tier": "a"})) == (
        "no registered host could ever run 3×GPU: 1 lacks the required host labels; "
        "1 has too few matching GPUs"
    )
    assert why_never(CapacityIndex(), demand(gpu_count=1)) == (
        "no registered host could ever run 1×GPU: no hosts are registered"
    )


@pytest.mark.databases("sqlite", "postgresql")
@pytest.mark.timeout(60)
async def test_registered_capacity_counts_lost_hosts_and_unhealthy_gpus_not_revoked_hosts(
    plane: JobPlane,
) -> None:
    kept = await scripted_host(plane, gpus=2, model="NVIDIA H100 80GB HBM3")
    revoked = await scripted_host(plane, gpus=4, model="NVIDIA B200")
    await kept.stop_heartbeats()  # it will be lost: it still counts
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    await stub.RevokeHost(
        registry_pb2.RevokeHostRequest(host_id=revoked.host_id, reason="test"),
        metadata=plane.auth(),
    )
    db = plane.plane.db
    assert db is not None
    async with db.transaction() as session:
        await session.execute(update(Gpu).where(Gpu.host_id == kept.host_id).values(healthy=False))
    async with db.read() as session:
        index = await load_registered(session)
    await kept.close()
    await revoked.close()
    assert set(index.hosts) == {kept.host_id}
    # Scripted hosts' GPUs are simulated.
    assert not could_run(index, demand(gpu_count=2, gpu_models=["h100"]))
    # Simulated hosts are never verified: only a job allowing both could ever run there.
    sim = {"allow_simulated": True, "allow_unverified": True}
    assert not could_run(index, demand(gpu_count=2, gpu_models=["h100"], allow_simulated=True))
    assert could_run(index, demand(gpu_count=2, gpu_models=["h100"], **sim))
    assert not could_run(index, demand(gpu_count=1, gpu_models=["b200"], **sim))
