"""Registry against a real control plane (NATS, S3) with scripted hosts: registration tokens
and host credentials, liveness (a lost host leaves the offers and comes back), and drain."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from gpuplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    messaging_pb2,
    registry_pb2,
    registry_pb2_grpc,
    types_pb2,
)
from sqlalchemy import select

from controlplane.db.base import utcnow
from controlplane.registry.models import RegistrationToken
from controlplane.registry.repository import RegistryRepository
from devstack.factories import new_token
from tests.controlplane.registry.test_telemetry import (
    TelemetryHost,
    eventually,
    get_host,
    telemetry_host,
)
from tests.harness import JobPlane

S = types_pb2
pytestmark = pytest.mark.timeout(30)


def registry(plane: JobPlane) -> registry_pb2_grpc.RegistryServiceAsyncStub:
    return registry_pb2_grpc.RegistryServiceStub(plane.channel)


async def refused(host: TelemetryHost) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await host.register()
    return caught.value


@pytest.mark.databases("sqlite", "postgresql")
async def test_hosts_racing_for_a_tokens_last_uses_get_exactly_its_uses(plane: JobPlane) -> None:
    """A use is counted at the end of the registration (the token's row is locked only until
    its commit), still atomically: of eight machines registering at once with a token of
    three uses, three become hosts and five are refused, leaving nothing behind."""
    token = await plane.token(max_uses=3)
    hosts = [TelemetryHost(plane.channel, plane.nats_url, token) for _ in range(8)]
    outcomes = await asyncio.gather(*(h.register() for h in hosts), return_exceptions=True)
    registered = [o for o in outcomes if not isinstance(o, BaseException)]
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(registered) == 3
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors)
    assert {(e.code(), e.details()) for e in errors if isinstance(e, grpc.aio.AioRpcError)} == {
        (grpc.StatusCode.PERMISSION_DENIED, "registration_token: has no uses left")
    }
    listed = await registry(plane).ListHosts(registry_pb2.ListHostsRequest(), metadata=plane.auth())
    assert sorted(h.host_id for h in listed.hosts) == sorted(r.host_id for r in registered)
    assert plane.plane.db is not None
    async with plane.plane.db.read() as session:
        uses = await session.scalar(
            select(RegistrationToken.uses).where(RegistrationToken.max_uses == 3)
        )
    assert uses == 3


async def test_registration_tokens_refused_when_unknown_expired_used_up_or_revoked(
    plane: JobPlane,
) -> None:
    unknown = await refused(TelemetryHost(plane.channel, plane.nats_url, "gpr_not-a-token"))
    assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unknown.details() == "registration_token: not a valid registration token"

    once = await plane.token(max_uses=1)
    first = TelemetryHost(plane.channel, plane.nats_url, once)
    await first.register()
    used_up = await refused(TelemetryHost(plane.channel, plane.nats_url, once))
    assert used_up.code() == grpc.StatusCode.PERMISSION_DENIED
    assert used_up.details() == "registration_token: has no uses left"
    # The same machine again: the same host, a new credential; the token's uses are spent.
    old_credential = first.credential
    again = await first.register()
    assert again.host_id == first.host_id
    assert again.host_credential != old_credential
    whoami = admin_pb2_grpc.AdminServiceStub(plane.channel).WhoAmI
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await whoami(admin_pb2.WhoAmIRequest(), metadata=plane.auth(old_credential))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    made = await new_token(plane, plane.provider_tenant)
    expiring_id, expiring = made.token.token_id, made.secret
    assert plane.plane.db is not None
    async with plane.plane.db.transaction() as session:
        token = await RegistryRepository(session).get_token(expiring_id)
        assert token is not None
        token.expires_at = utcnow() - timedelta(seconds=1)
    expired = await refused(TelemetryHost(plane.channel, plane.nats_url, expiring))
    assert expired.code() == grpc.StatusCode.PERMISSION_DENIED
    assert expired.details() == "registration_token: has expired"

    made = await new_token(plane, plane.provider_tenant)
    revoking_id, revoking = made.token.token_id, made.secret
    await admin_pb2_grpc.AdminServiceStub(plane.channel).RevokeRegistrationToken(
        admin_pb2.RevokeRegistrationTokenRequest(token_id=revoking_id),
        metadata=plane.auth(),
    )
    revoked = await refused(TelemetryHost(plane.channel, plane.nats_url, revoking))
    assert revoked.code() == grpc.StatusCode.PERMISSION_DENIED
    assert revoked.details() == "registration_token: has been revoked"


async def test_host_credential_acts_only_as_its_own_host(plane: JobPlane) -> None:
    mine = await telemetry_host(plane, gpus=1)
    other = await telemetry_host(plane, gpus=1)
    try:
        call = registry(plane).Connect(metadata=plane.auth(mine.credential))  # type: ignore[call-arg]
        hello = registry_pb2.DaemonHello(host_id=other.host_id)
        await call.write(registry_pb2.DaemonMessage(hello=hello))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "acts only as its own host" in (caught.value.details() or "")

        as_host = plane.auth(mine.credential)
        calls: list[Awaitable[Any]] = [
            jobs_pb2_grpc.JobServiceStub(plane.channel).SubmitJob(
                jobs_pb2.SubmitJobRequest(spec=S.JobSpec(image="x", max_duration_seconds=1)),
                metadata=as_host,
            ),
            admin_pb2_grpc.AdminServiceStub(plane.channel).CreateTenant(
                admin_pb2.CreateTenantRequest(name="evil"), metadata=as_host
            ),
            registry(plane).DrainHost(
                registry_pb2.DrainHostRequest(host_id=mine.host_id), metadata=as_host
            ),
        ]
        for pending in calls:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await pending
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not allowed for role host" in (denied.value.details() or "")
    finally:
        await mine.close()
        await other.close()


async def offered_hosts(plane: JobPlane) -> set[str]:
    reply = await registry(plane).ListOffers(
        registry_pb2.ListOffersRequest(), metadata=plane.auth(plane.consumer_key)
    )
    return {o.host_id for o in reply.offers}


async def test_lost_host_leaves_offers_and_returns_on_reconnect(plane: JobPlane) -> None:
    host = await telemetry_host(plane, gpus=2)
    try:
        assert await offered_hosts(plane) == {host.host_id}
        await host.stop_heartbeats()

        async def lost() -> bool:
            shown = await get_host(plane, host.host_id)
            return shown.state == S.HOST_STATE_LOST

        await eventually(lost, timeout=8)
        assert await offered_hosts(plane) == set()  # the moment it is lost
        await host.open_stream()
        assert (await get_host(plane, host.host_id)).state == S.HOST_STATE_ONLINE
        assert await offered_hosts(plane) == {host.host_id}
    finally:
        await host.close()


async def drain(plane: JobPlane, host_id: str, reason: str = "") -> types_pb2.Host:
    reply = await registry(plane).DrainHost(
        registry_pb2.DrainHostRequest(host_id=host_id, reason=reason), metadata=plane.auth()
    )
    return reply.host


async def state_of(plane: JobPlane, host_id: str, state: int) -> bool:
    return (await get_host(plane, host_id)).state == state


async def test_drain_lets_running_jobs_finish_then_drained_then_undrain(plane: JobPlane) -> None:
    host = await telemetry_host(plane, gpus=2)
    try:
        running = await plane.submit(gpu_count=1)
        dispatch = await host.next_dispatch()
        await host.report(dispatch, messaging_pb2.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(running.job_id, [S.JOB_STATE_RUNNING])

        drained = await drain(plane, host.host_id, "kernel upgrade")
        assert drained.state == S.HOST_STATE_DRAINING
        assert drained.drain_reason == "kernel upgrade"
        command = await asyncio.wait_for(host.commands.get(), 5)
        assert command.drain.draining
        assert command.drain.reason == "kernel upgrade"
        assert await offered_hosts(plane) == set()
        waiting = await plane.submit(gpu_count=1)
        await asyncio.sleep(0.5)
        assert (await plane.get(waiting.job_id)).state == S.JOB_STATE_QUEUED
        assert (await plane.get(running.job_id)).state == S.JOB_STATE_RUNNING

        await host.report(dispatch, messaging_pb2.JOB_REPORT_KIND_FINISHED, exit_code=0)
        await plane.wait_for(running.job_id, [S.JOB_STATE_SUCCEEDED])
        await eventually(lambda: state_of(plane, host.host_id, S.HOST_STATE_DRAINED))

        undrained = await registry(plane).UndrainHost(
            registry_pb2.UndrainHostRequest(host_id=host.host_id), metadata=plane.auth()
        )
        assert undrained.host.state == S.HOST_STATE_ONLINE
        assert undrained.host.drain_reason == ""
        assert (await host.next_dispatch()).job_id == waiting.job_id
    finally:
        await host.close()


async def test_idle_host_drains_at_once_and_a_lost_host_keeps_its_drain(plane: JobPlane) -> None:
    host = await telemetry_host(plane, gpus=1)
    try:
        assert (await drain(plane, host.host_id)).state == S.HOST_STATE_DRAINED
        told = await asyncio.wait_for(host.commands.get(), 5)
        assert told.drain.reason == "drain requested"
        await host.stop_heartbeats()
        await eventually(lambda: state_of(plane, host.host_id, S.HOST_STATE_LOST), timeout=8)
        assert (await drain(plane, host.host_id, "still wanted")).state == S.HOST_STATE_LOST
        await host.open_stream()  # back: drains, and is told so on connect
        command = await asyncio.wait_for(host.commands.get(), 5)
        assert command.drain.draining
        assert command.drain.reason == "still wanted"
        await eventually(lambda: state_of(plane, host.host_id, S.HOST_STATE_DRAINED))
        assert await offered_hosts(plane) == set()
    finally:
        await host.close()
