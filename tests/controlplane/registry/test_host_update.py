"""UpdateHost: a provider changes its host's price, location and labels at run time; a price
change applies to jobs placed from then on (running attempts keep theirs), location and labels
change what offers and job constraints match; foreign hosts are hidden, bad values named."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from gpuplane.v1 import messaging_pb2, registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.ledger.service import charge_for
from devstack.factories import new_key, new_tenant
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.databases("sqlite", "postgresql")]
OLD, NEW = 1 * CREDIT, 2 * CREDIT
RUN_MS = 300_000  # five minutes (the jobs may run ten)


def registry(plane: JobPlane) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    return registry_pb2_grpc.RegistryServiceStub(plane.channel)


async def provider_key(plane: JobPlane) -> str:
    return await new_key(plane, plane.provider_tenant, S.ROLE_PROVIDER)


async def update(plane: JobPlane, key: str, host_id: str, **fields: Any) -> S.Host:
    request = registry_pb2.UpdateHostRequest(host_id=host_id, **fields)
    return (await registry(plane).UpdateHost(request, metadata=plane.auth(key))).host


async def run_to_success(host: ScriptedHost, dispatch: Any) -> None:
    await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await host.report(dispatch, K.JOB_REPORT_KIND_UPLOADING, exit_code=0, run_time_ms=RUN_MS)
    await host.report(
        dispatch,
        K.JOB_REPORT_KIND_FINISHED,
        exit_code=0,
        run_time_ms=RUN_MS,
        manifest=[S.ResultObject(key="k", path="logs/stdout", size_bytes=1, sha256="00")],
    )


async def test_a_price_change_applies_to_the_next_job_only(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1, price=OLD)
    key = await provider_key(plane)
    try:
        first = await plane.submit(gpu_count=1, max_price_per_gpu_hour_micro_credits=3 * CREDIT)
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == first.job_id
        await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(first.job_id, [S.JOB_STATE_RUNNING])

        changed = await update(plane, key, host.host_id, price_per_gpu_hour_micro_credits=NEW)
        assert changed.price_per_gpu_hour_micro_credits == NEW

        # The running job keeps the price it was placed at, to its charge.
        await run_to_success(host, dispatch)
        done = await plane.wait_for(first.job_id, [S.JOB_STATE_SUCCEEDED])
        assert done.price_per_gpu_hour_micro_credits == OLD
        assert done.charged_micro_credits == charge_for(OLD, 1, RUN_MS)

        # The next job is held, placed and charged at the new price.
        second = await plane.submit(gpu_count=1, max_price_per_gpu_hour_micro_credits=3 * CREDIT)
        assert second.hold_micro_credits == charge_for(NEW, 1, 600_000)
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == second.job_id
        await run_to_success(host, dispatch)
        done = await plane.wait_for(second.job_id, [S.JOB_STATE_SUCCEEDED])
        assert done.price_per_gpu_hour_micro_credits == NEW
        assert done.charged_micro_credits == charge_for(NEW, 1, RUN_MS)
    finally:
        await host.close()
    await plane.assert_ledger_consistent()


async def offered_hosts(plane: JobPlane, **wanted: Any) -> list[str]:
    reply = await registry(plane).ListOffers(
        registry_pb2.ListOffersRequest(**wanted), metadata=plane.auth(plane.consumer_key)
    )
    return [o.host_id for o in reply.offers]


async def test_location_and_labels_change_what_offers_and_jobs_match(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1, price=OLD)
    key = await provider_key(plane)
    try:
        assert await offered_hosts(plane, location="eu-west") == []
        changed = await update(
            plane, key, host.host_id, location="eu-west", replace_labels=True, labels={"t": "a"}
        )
        assert changed.location == "eu-west"
        assert dict(changed.labels) == {"t": "a"}
        assert await offered_hosts(plane, location="eu-west") == [host.host_id]
        assert await offered_hosts(plane, labels={"t": "a"}) == [host.host_id]

        # Unset fields keep their values: a price-only update leaves location and labels.
        kept = await update(
            plane, plane.admin_key, host.host_id, price_per_gpu_hour_micro_credits=NEW
        )
        assert (kept.location, dict(kept.labels)) == ("eu-west", {"t": "a"})

        job = await plane.submit(gpu_count=1, locations=["eu-west"], host_labels={"t": "a"})
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == job.job_id

        moved = await update(
            plane, key, host.host_id, location="us-east", replace_labels=True, labels={}
        )
        assert (moved.location, dict(moved.labels)) == ("us-east", {})
        assert await offered_hosts(plane, location="eu-west") == []
        assert await offered_hosts(plane, labels={"t": "a"}) == []
        await run_to_success(host, dispatch)
        await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    finally:
        await host.close()


async def test_foreign_hosts_are_hidden_and_bad_values_named(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1, price=OLD)
    key = await provider_key(plane)
    stranger = await new_tenant(plane, "other-provider", S.ROLE_PROVIDER)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await update(plane, stranger.key, host.host_id, price_per_gpu_hour_micro_credits=1)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        cases: list[tuple[dict[str, Any], str]] = [
            ({"host_id": ""}, "host_id"),
            ({"price_per_gpu_hour_micro_credits": 0}, "price_per_gpu_hour_micro_credits"),
            ({"price_per_gpu_hour_micro_credits": -5}, "price_per_gpu_hour_micro_credits"),
            ({"price_per_gpu_hour_micro_credits": 100 * CREDIT + 1}, "price_per_gpu_hour"),
            ({"location": "x" * 101}, "location"),
            ({"replace_labels": True, "labels": {f"k{i}": "v" for i in range(65)}}, "labels"),
        ]
        for fields, name in cases:
            fields.setdefault("host_id", host.host_id)
            request = registry_pb2.UpdateHostRequest(**fields)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await registry(plane).UpdateHost(request, metadata=plane.auth(key))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
            assert (caught.value.details() or "").startswith(name), caught.value.details()
        reply = await registry(plane).GetHost(
            registry_pb2.GetHostRequest(host_id=host.host_id), metadata=plane.auth(key)
        )
        assert reply.host.price_per_gpu_hour_micro_credits == OLD
        assert reply.host.location == "test-lab"
    finally:
        await host.close()
