"""ServiceService on a real control plane with no host (replicas stay queued), on SQLite and
PostgreSQL: bad input names its field and holds nothing; a name is the tenant's until the
service is deleted (ALREADY_EXISTS, then free again); scaling, stopping and starting move
replicas and their holds; a deleted or another tenant's service is NOT_FOUND."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, services_pb2, services_pb2_grpc, types_pb2

from controlplane.ledger.transfers import charge_for
from devstack.factories import new_tenant
from tests.harness import CREDIT, JobPlane

S = types_pb2
pytestmark = [pytest.mark.timeout(60), pytest.mark.databases("sqlite", "postgresql")]
PRICE = 2 * CREDIT  # per GPU-hour
LEASE = 3600  # the default lease a replica is held for


def stub(plane: JobPlane) -> services_pb2_grpc.ServiceServiceAsyncStub:
    return services_pb2_grpc.ServiceServiceStub(plane.channel)


def deploy(
    name: str = "web",
    replicas: int = 2,
    port: int = 8080,
    health_path: str = "/",
    idempotency_key: str = "",
) -> services_pb2.DeployServiceRequest:
    spec = S.JobSpec(image="busybox", gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE)
    return services_pb2.DeployServiceRequest(
        name=name,
        spec=spec,
        port=port,
        replicas=replicas,
        health_path=health_path,
        idempotency_key=idempotency_key,
    )


async def refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


async def until(
    plane: JobPlane, ref: str, check: object, timeout: float = 15.0
) -> services_pb2.Service:
    """The service once `check(service)` holds, polled (the reconciler works in the
    background)."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    auth = plane.auth(plane.consumer_key)
    while True:
        got = await stub(plane).GetService(
            services_pb2.GetServiceRequest(service=ref), metadata=auth
        )
        if check(got.service):
            return got.service
        assert time.monotonic() < deadline, got.service
        await asyncio.sleep(0.05)


def live(service: services_pb2.Service) -> list[services_pb2.ServiceReplica]:
    ended = (S.JOB_STATE_CANCELLED, S.JOB_STATE_FAILED, S.JOB_STATE_SUCCEEDED)
    return [r for r in service.replicas if r.state not in ended]


async def test_bad_input_names_its_field_and_holds_nothing(plane: JobPlane) -> None:
    auth = plane.auth(plane.consumer_key)
    cases = {
        "port": [deploy(port=0), deploy(port=65536)],
        "replicas": [deploy(replicas=33)],
        "health_path": [deploy(health_path="healthz"), deploy(health_path="http://x/healthz")],
        "name": [deploy(name=""), deploy(name="Web App"), deploy(name="9web")],
    }
    for field, requests in cases.items():
        for bad in requests:
            details = await refused(
                stub(plane).DeployService(bad, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert details.startswith(f"{field}:"), details
    owned = deploy()
    owned.spec.max_duration_seconds = 60
    details = await refused(
        stub(plane).DeployService(owned, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details.startswith("spec.max_duration_seconds:")
    # Only a service makes a replica: SubmitJob refuses the field.
    job = S.JobSpec(image="busybox", max_duration_seconds=60)
    job.service_replica.port = 80
    details = await refused(
        plane.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=job), metadata=auth),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith("spec.service_replica:")
    listed = await stub(plane).ListServices(services_pb2.ListServicesRequest(), metadata=auth)
    assert list(listed.services) == []
    balance = await plane.balance(plane.consumer_tenant)
    assert (balance.held_micro_credits, balance.available_micro_credits) == (0, 100 * CREDIT)


async def test_lifecycle_names_holds_and_tenants(plane: JobPlane) -> None:
    auth = plane.auth(plane.consumer_key)
    made = (await stub(plane).DeployService(deploy(idempotency_key="d1"), metadata=auth)).service
    assert made.service_id.startswith("svc_")
    assert (made.state, made.desired_replicas, made.port) == (
        services_pb2.SERVICE_STATE_ACTIVE,
        2,
        8080,
    )
    again = await stub(plane).DeployService(deploy(idempotency_key="d1"), metadata=auth)
    assert again.service.service_id == made.service_id
    details = await refused(
        stub(plane).DeployService(deploy(replicas=1), metadata=auth),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert details.startswith("name:"), details

    # No host: the first replica waits queued, holding its lease's price.
    queued = await until(plane, "web", lambda s: len(live(s)) >= 1)
    replica = live(queued)[0]
    assert replica.replica_id.startswith("rep_")
    assert replica.state == S.JOB_STATE_QUEUED
    job = await plane.get(replica.replica_id)
    assert job.spec.service_replica.service_id == made.service_id
    assert job.hold_micro_credits == charge_for(PRICE, 1, LEASE * 1000)

    # Another tenant sees nothing of it, by name or id.
    _, other_key = await new_tenant(plane, "other", S.ROLE_CONSUMER)
    other = plane.auth(other_key)
    for ref in ("web", made.service_id):
        await refused(
            stub(plane).GetService(services_pb2.GetServiceRequest(service=ref), metadata=other),
            grpc.StatusCode.NOT_FOUND,
        )
        await refused(
            stub(plane).ScaleService(
                services_pb2.ScaleServiceRequest(service=ref, replicas=0), metadata=other
            ),
            grpc.StatusCode.NOT_FOUND,
        )

    # Scaled to 0: the queued replicas end CANCELLED and their holds go.
    await stub(plane).ScaleService(
        services_pb2.ScaleServiceRequest(service="web", replicas=0), metadata=auth
    )
    scaled = await until(plane, "web", lambda s: not live(s))
    assert scaled.desired_replicas == 0
    assert scaled.restarts == 0
    assert not scaled.last_failure
    assert all(r.state == S.JOB_STATE_CANCELLED for r in scaled.replicas)
    assert (await plane.balance(plane.consumer_tenant)).held_micro_credits == 0

    # Stopped, then started: a replica is launched again.
    await stub(plane).ScaleService(
        services_pb2.ScaleServiceRequest(service="web", replicas=1), metadata=auth
    )
    stopped = await stub(plane).StopService(
        services_pb2.StopServiceRequest(service="web"), metadata=auth
    )
    assert stopped.service.state == services_pb2.SERVICE_STATE_STOPPED
    await until(plane, "web", lambda s: not live(s))
    await stub(plane).StartService(services_pb2.StartServiceRequest(service="web"), metadata=auth)
    await until(plane, "web", lambda s: len(live(s)) == 1)

    # Deleted: its replicas stop, its name is free, and it can no longer be scaled or started.
    deleted = await stub(plane).DeleteService(
        services_pb2.DeleteServiceRequest(service="web"), metadata=auth
    )
    assert deleted.service.state == services_pb2.SERVICE_STATE_DELETED
    await until(plane, made.service_id, lambda s: not live(s))
    for call in (
        stub(plane).ScaleService(
            services_pb2.ScaleServiceRequest(service=made.service_id, replicas=1), metadata=auth
        ),
        stub(plane).StartService(
            services_pb2.StartServiceRequest(service=made.service_id), metadata=auth
        ),
        stub(plane).GetService(services_pb2.GetServiceRequest(service="web"), metadata=auth),
    ):
        await refused(call, grpc.StatusCode.NOT_FOUND)
    anew = await stub(plane).DeployService(deploy(replicas=0), metadata=auth)
    assert anew.service.service_id != made.service_id
    listed = await stub(plane).ListServices(services_pb2.ListServicesRequest(), metadata=auth)
    assert [s.service_id for s in listed.services] == [anew.service.service_id]
    everything = await stub(plane).ListServices(
        services_pb2.ListServicesRequest(include_deleted=True), metadata=auth
    )
    assert {s.service_id for s in everything.services} == {
        made.service_id,
        anew.service.service_id,
    }
    assert (await plane.balance(plane.consumer_tenant)).held_micro_credits == 0
    await plane.assert_ledger_consistent()
