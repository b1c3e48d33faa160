"""Hostile providers against identity, reliability and revocation: hosts that register and
never connect, re-registration to shed a bad record, a provider revoked as a whole, and
providers minting their own registration tokens."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from gpuplane.v1 import (
    admin_pb2,
    messaging_pb2,
    registry_pb2,
    registry_pb2_grpc,
    types_pb2,
)

from controlplane.registry.repository import RegistryRepository
from devstack.factories import (
    CREDIT,
    bearer,
    new_gpus,
    new_host,
    new_key,
    new_online_host,
    new_tenant,
    new_token,
    say_hello,
)
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane
from tests.reliability import summary

S = types_pb2
K = messaging_pb2
PRICE = 2 * CREDIT
pytestmark = [pytest.mark.timeout(60), pytest.mark.plane(heartbeat_timeout_ms=60_000)]


def registry(plane: JobPlane) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    return registry_pb2_grpc.RegistryServiceStub(plane.channel)


async def get_host(plane: JobPlane, host_id: str) -> types_pb2.Host:
    reply = await registry(plane).GetHost(
        registry_pb2.GetHostRequest(host_id=host_id), metadata=plane.auth()
    )
    return reply.host


async def offered(plane: JobPlane) -> set[str]:
    reply = await registry(plane).ListOffers(
        registry_pb2.ListOffersRequest(), metadata=plane.auth(plane.consumer_key)
    )
    return {o.host_id for o in reply.offers}


async def refused(call: object, code: grpc.StatusCode) -> str:
    """The details of the error `call` (an awaitable RPC) must end with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


async def squatter(plane: JobPlane) -> registry_pb2.RegisterHostResponse:
    """A host registered at the lowest price there is, with a fresh machine id, whose daemon
    never connects."""
    machine = uuid.uuid4().hex
    return await new_host(
        plane.channel,
        await plane.token(),
        machine_id=machine,
        gpus=new_gpus(8, prefix=machine[:8]),
        price_per_gpu_hour_micro_credits=1,
    )


async def test_a_registered_host_that_never_connects_gets_no_job(plane: JobPlane) -> None:
    squatters = [await squatter(plane) for _ in range(3)]
    real = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        for host in squatters:
            assert (await get_host(plane, host.host_id)).state == S.HOST_STATE_REGISTERED
        assert await offered(plane) == {real.host_id}
        first = await plane.submit(gpu_count=1)
        dispatch = await real.next_dispatch()
        assert dispatch.job_id == first.job_id
        # The real host is full: the next job waits rather than going to a squatter.
        waiting = await plane.submit(gpu_count=1)
        await asyncio.sleep(1.5)
        job = await plane.get(waiting.job_id)
        assert job.state == S.JOB_STATE_QUEUED
        assert "0 of 1 online hosts" in job.state_reason
        for host in squatters:
            assert (await get_host(plane, host.host_id)).state == S.HOST_STATE_REGISTERED
        # Its daemon's hello, and nothing else, admits a host: then it takes the job.
        await say_hello(plane.channel, squatters[0])
        assert (await get_host(plane, squatters[0].host_id)).state == S.HOST_STATE_ONLINE
        placed = await plane.wait_for(waiting.job_id, [S.JOB_STATE_SCHEDULED])
        assert placed.host_id == squatters[0].host_id
    finally:
        await real.close()
    summary.record(
        "a registered host that never connects",
        "3 hosts at 1 micro-credit/GPU-hour, never connected: not offered, 0 jobs",
        faults_injected=3,
        jobs_run=2,
    )


async def _lose_one_attempt(plane: JobPlane) -> str:
    """A host of the plane's provider loses an attempt to a host fault; returns its id."""
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, max_retries=0)
        dispatch = await host.next_dispatch()
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await host.report(dispatch, K.JOB_REPORT_KIND_STOPPED, stop_reason=K.STOP_REASON_HOST_ERROR)
        await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
        # The same machine registers again (a fresh credential): the same host, same record.
        again = await host.register()
        assert again.host_id == host.host_id
    finally:
        await host.close()
    return host.host_id


async def test_re_registering_does_not_reset_reliability(plane: JobPlane) -> None:
    bad = await _lose_one_attempt(plane)
    # One bad outcome over the prior (90 % worth five outcomes): (0 + 4.5) / 6.
    assert (await get_host(plane, bad)).reliability_permille == 750
    # A fresh machine id of the same provider starts where its provider stands.
    fresh = await new_online_host(plane.channel, await plane.token(), gpus=new_gpus(1))
    assert (await get_host(plane, fresh.host_id)).reliability_permille == 750
    # Another provider's first host starts from the prior, not from 100 %.
    other, _ = await new_tenant(plane, "honest provider", S.ROLE_PROVIDER)
    token = (await new_token(plane, other)).secret
    honest = await new_online_host(plane.channel, token, gpus=new_gpus(1))
    assert (await get_host(plane, honest.host_id)).reliability_permille == 900

    # min_reliability keeps jobs off the provider with the record, whatever its price.
    choosy = await plane.submit(gpu_count=1, min_reliability_permille=800)
    placed = await plane.wait_for(choosy.job_id, [S.JOB_STATE_SCHEDULED])
    assert placed.host_id == honest.host_id
    strict = await plane.submit(gpu_count=1, min_reliability_permille=950)
    await asyncio.sleep(1.0)
    job = await plane.get(strict.job_id)
    assert job.state == S.JOB_STATE_QUEUED
    assert "less reliable than min_reliability" in job.state_reason
    details = await refused(
        plane.submit(gpu_count=1, min_reliability_permille=1001), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "spec.min_reliability_permille" in details
    summary.record(
        "re-registration to reset reliability",
        "a lost attempt, the same machine and a fresh one re-registered: both stay at 750",
        faults_injected=2,
        jobs_run=3,
    )


async def test_a_provider_revoked_as_a_whole_loses_every_host(plane: JobPlane) -> None:
    running = await scripted_host(plane, price=PRICE, gpus=1)
    idle = await squatter(plane)
    unused = await plane.token()
    try:
        job = await plane.submit(gpu_count=1)
        await running.next_dispatch()
        reply = await registry(plane).RevokeProvider(
            registry_pb2.RevokeProviderRequest(
                provider_tenant_id=plane.provider_tenant, reason="fraud"
            ),
            metadata=plane.auth(),
        )
        assert set(reply.host_ids) == {running.host_id, idle.host_id}
        assert reply.revoked_tokens == 3
        for host_id in reply.host_ids:
            host = await get_host(plane, host_id)
            assert host.state == S.HOST_STATE_LOST
            assert host.revoked_reason == "fraud"
        # Its running attempt is lost at once (never charged) and the job waits for a host.
        requeued = await plane.wait_for(job.job_id, [S.JOB_STATE_QUEUED])
        assert requeued.attempts[0].attempt_state == S.ATTEMPT_STATE_LOST
        assert requeued.charged_micro_credits == 0
        # Neither its tokens nor its hosts' credentials nor its machines work any more.
        register = new_host(plane.channel, unused, gpus=new_gpus(1))
        assert "revoked" in await refused(register, grpc.StatusCode.PERMISSION_DENIED)
        fresh = await plane.token()
        machine = new_host(plane.channel, fresh, machine_id=running.machine_id, gpus=new_gpus(1))
        assert "machine_id" in await refused(machine, grpc.StatusCode.PERMISSION_DENIED)
        hello = say_hello(plane.channel, idle)
        await refused(hello, grpc.StatusCode.UNAUTHENTICATED)
        assert running.host_id not in await offered(plane)
    finally:
        await running.close()
    again = await registry(plane).RevokeProvider(
        registry_pb2.RevokeProviderRequest(provider_tenant_id=plane.provider_tenant),
        metadata=plane.auth(),
    )
    # Idempotent for the hosts; the token an admin minted since is revoked now.
    assert (set(again.host_ids), again.revoked_tokens) == ({running.host_id, idle.host_id}, 1)
    for bad, code in (("", "INVALID_ARGUMENT"), ("ten_nobody", "NOT_FOUND")):
        request = registry_pb2.RevokeProviderRequest(provider_tenant_id=bad)
        call = registry(plane).RevokeProvider(request, metadata=plane.auth())
        assert "provider_tenant_id" in await refused(call, getattr(grpc.StatusCode, code))
    provider_key = await new_key(plane, plane.provider_tenant, S.ROLE_PROVIDER)
    request = registry_pb2.RevokeProviderRequest(provider_tenant_id=plane.provider_tenant)
    call = registry(plane).RevokeProvider(request, metadata=bearer(provider_key))
    await refused(call, grpc.StatusCode.PERMISSION_DENIED)
    await plane.assert_ledger_consistent()
    summary.record(
        "a provider revoked as a whole",
        "2 hosts (one running, one never connected) and 3 tokens: all refused after",
        faults_injected=1,
        jobs_run=1,
    )


async def _mint_own(plane: JobPlane) -> admin_pb2.CreateRegistrationTokenResponse:
    provider_key = await new_key(plane, plane.provider_tenant, S.ROLE_PROVIDER)
    request = admin_pb2.CreateRegistrationTokenRequest(provider_tenant_id=plane.provider_tenant)
    return await plane.admin.CreateRegistrationToken(request, metadata=bearer(provider_key))


async def test_providers_cannot_mint_their_own_tokens_by_default(plane: JobPlane) -> None:
    details = await refused(_mint_own(plane), grpc.StatusCode.PERMISSION_DENIED)
    assert "GPUPLANE_SELF_SERVICE_PROVIDERS" in details
    listed = await plane.admin.ListRegistrationTokens(
        admin_pb2.ListRegistrationTokensRequest(provider_tenant_id=plane.provider_tenant),
        metadata=plane.auth(),
    )
    assert list(listed.tokens) == []
    # An admin mints one for the provider.
    assert (await new_token(plane, plane.provider_tenant)).secret.startswith("gpr_")
    summary.record(
        "self-service token minting",
        "a provider minting its own token, setting off or provider revoked: PERMISSION_DENIED",
        requests_tried=1,
    )


@pytest.mark.plane(self_service_providers=True)
async def test_self_service_providers_mint_tokens_and_still_start_registered(
    plane: JobPlane,
) -> None:
    minted = await _mint_own(plane)
    assert minted.token.provider_tenant_id == plane.provider_tenant
    host = await new_host(plane.channel, minted.secret, gpus=new_gpus(1))
    assert (await get_host(plane, host.host_id)).state == S.HOST_STATE_REGISTERED
    assert host.host_id not in await offered(plane)
    admitted = await new_host(plane.channel, await plane.token(), gpus=new_gpus(1))
    # Marked for the verification gate (registry.states.hello_state), unlike an admin's.
    assert plane.plane.db is not None
    async with plane.plane.db.read() as session:
        repo = RegistryRepository(session)
        marks = [(await repo.get_host(h.host_id)) for h in (host, admitted)]
    assert [h.self_service for h in marks if h is not None] == [True, False]
    # A provider revoked as a whole cannot mint its way back in; an admin still may.
    await registry(plane).RevokeProvider(
        registry_pb2.RevokeProviderRequest(provider_tenant_id=plane.provider_tenant),
        metadata=plane.auth(),
    )
    details = await refused(_mint_own(plane), grpc.StatusCode.PERMISSION_DENIED)
    assert "RevokeProvider" in details
    assert (await new_token(plane, plane.provider_tenant)).secret.startswith("gpr_")
    summary.record("self-service token minting", requests_tried=2)
