"""ListOffers against a real control plane: every filter, the order (price, then reliability),
paging, and what takes GPUs out of the offers (unhealthy GPUs, draining hosts)."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.db.base import utcnow
from controlplane.registry.repository import RegistryRepository
from devstack.factories import CREDIT, new_gpus, new_online_host
from tests.harness import JobPlane

S = types_pb2
# These hosts say hello once and never heartbeat: keep them online for the test's duration.
pytestmark = [pytest.mark.timeout(30), pytest.mark.plane(heartbeat_timeout_ms=120_000)]


def registry(plane: JobPlane) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    return registry_pb2_grpc.RegistryServiceStub(plane.channel)


async def register(
    plane: JobPlane,
    model: str,
    vram_gib: int,
    count: int,
    price: float,
    location: str,
    labels: dict[str, str] | None = None,
    simulated: bool = False,
) -> str:
    machine = uuid.uuid4().hex
    reply = await new_online_host(
        plane.channel,
        await plane.token(),
        machine_id=machine,
        hostname=f"offers-{machine[:6]}",
        gpus=new_gpus(count, model, vram_gib=vram_gib, prefix=machine[:8]),
        simulated=simulated,
        price_per_gpu_hour_micro_credits=int(price * CREDIT),
        location=location,
        labels=labels or {},
    )
    return str(reply.host_id)


async def offers(plane: JobPlane, **request: Any) -> list[types_pb2.Offer]:
    reply = await registry(plane).ListOffers(
        registry_pb2.ListOffersRequest(**request), metadata=plane.auth(plane.consumer_key)
    )
    return list(reply.offers)


async def test_offer_filters_order_and_paging(plane: JobPlane) -> None:
    gold = {"tier": "gold"}
    h100 = await register(plane, "NVIDIA H100 80GB HBM3", 80, 8, 3.0, "eu-west", gold)
    small = await register(plane, "NVIDIA A100-SXM4-40GB", 40, 2, 1.0, "us-east", simulated=True)
    flaky = await register(plane, "NVIDIA A100-SXM4-80GB", 80, 4, 1.0, "us-east", gold)
    steady = await register(plane, "NVIDIA A100-SXM4-80GB", 80, 1, 1.0, "us-east")
    assert plane.plane.db is not None
    async with plane.plane.db.transaction() as session:
        repo = RegistryRepository(session)
        for host_id, good, lost in ((flaky, 1, 3), (steady, 5, 0)):
            host = await repo.get_host(host_id)
            assert host is not None
            host.reliability_good, host.reliability_bad, host.reliability_at = good, lost, utcnow()

    everything = await offers(plane)
    # Cheapest first; at one price the more reliable first; then by host id.
    assert [o.host_id for o in everything] == [steady, small, flaky, h100]
    by_host = {o.host_id: o for o in everything}
    # Each host's outcomes over its provider's other hosts' (over a 90 % prior worth five):
    # flaky (1, 3) over (5, 0): (1 + 5 × 0.95) / 9; steady (5, 0) over (1, 3); the others,
    # with none of their own, stand where their provider does: (6 + 4.5) / 14.
    assert by_host[flaky].reliability_permille == 639
    assert by_host[steady].reliability_permille == 806
    assert by_host[small].reliability_permille == 750
    first = by_host[h100]
    assert (first.gpu_model, first.vram_gib, first.free_gpu_count, first.total_gpu_count) == (
        "NVIDIA H100 80GB HBM3",
        80,
        8,
        8,
    )
    assert first.compute_capability == "9.0"
    assert first.location == "eu-west"
    assert dict(first.labels) == gold
    assert by_host[small].simulated
    assert not first.simulated

    async def hosts(**request: Any) -> set[str]:
        return {o.host_id for o in await offers(plane, **request)}

    assert await hosts(gpu_type="h100") == {h100}
    assert await hosts(gpu_type=" A100-sxm4-80") == {flaky, steady}
    assert await hosts(min_vram_gib=41) == {h100, flaky, steady}
    assert await hosts(max_price_per_gpu_hour_micro_credits=int(1.5 * CREDIT)) == {
        small,
        flaky,
        steady,
    }
    assert await hosts(min_gpu_count=4) == {h100, flaky}
    assert await hosts(location="US-East") == {small, flaky, steady}
    assert await hosts(labels=gold) == {h100, flaky}
    assert await hosts(exclude_simulated=True) == {h100, flaky, steady}
    assert await hosts(gpu_type="a100", min_vram_gib=80, exclude_simulated=True, labels=gold) == {
        flaky
    }
    assert await hosts(gpu_type="B200") == set()

    page = await registry(plane).ListOffers(
        registry_pb2.ListOffersRequest(page_size=3), metadata=plane.auth(plane.consumer_key)
    )
    rest = await registry(plane).ListOffers(
        registry_pb2.ListOffersRequest(page_size=3, page_token=page.next_page_token),
        metadata=plane.auth(plane.consumer_key),
    )
    assert [o.host_id for o in [*page.offers, *rest.offers]] == [o.host_id for o in everything]
    assert page.next_page_token
    assert rest.next_page_token == ""

    for bad in (
        registry_pb2.ListOffersRequest(page_token="not-a-token"),
        registry_pb2.ListOffersRequest(max_price_per_gpu_hour_micro_credits=-1),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry(plane).ListOffers(bad, metadata=plane.auth(plane.consumer_key))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unhealthy_gpus_and_draining_hosts_are_not_offered(plane: JobPlane) -> None:
    h100 = await register(plane, "NVIDIA H100 80GB HBM3", 80, 8, 3.0, "eu-west")
    other = await register(plane, "NVIDIA A100-SXM4-80GB", 80, 1, 1.0, "us-east")
    assert plane.plane.db is not None
    async with plane.plane.db.transaction() as session:
        repo = RegistryRepository(session)
        gpu = (await repo.gpus_of([h100]))[0]
        assert await repo.set_gpu_health(gpu.uuid, h100, False, "XID 79 at now") == ""
    (offer,) = await offers(plane, gpu_type="H100")
    assert (offer.free_gpu_count, offer.total_gpu_count) == (7, 7)

    await registry(plane).DrainHost(
        registry_pb2.DrainHostRequest(host_id=other, reason="maintenance"), metadata=plane.auth()
    )
    assert {o.host_id for o in await offers(plane)} == {h100}
