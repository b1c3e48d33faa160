"""The control plane's side of tunnels, with scripted hosts playing the daemon: the tunnel
command reaches the job's host naming this replica; only that host may call back, once; frames
are relayed both ways and the exit code ends the client's call; no call back is UNAVAILABLE;
a stored tunnel command expires instead of being re-sent forever."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from gpuplane.v1 import registry_pb2, tunnels_pb2, tunnels_pb2_grpc
from sqlalchemy import select, update

from controlplane.commands.models import HostCommand
from controlplane.commands.repository import CommandRepository
from controlplane.db.base import utcnow
from tests.controlplane.registry.test_commands import next_command, running_job
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import JobPlane

T = tunnels_pb2
pytestmark = [pytest.mark.timeout(60)]


async def exec_requests(job_id: str, stop: asyncio.Event) -> AsyncIterator[T.ExecRequest]:
    yield T.ExecRequest(start=T.ExecStart(job_id=job_id, command=["cat"], stdin=True))
    yield T.ExecRequest(stdin=b"ping")
    await stop.wait()


def relay_call(plane: JobPlane, host: ScriptedHost, frames: list[T.TunnelFrame]) -> Any:
    stub = tunnels_pb2_grpc.TunnelRelayServiceStub(plane.channel)
    metadata = (("authorization", f"Bearer {host.credential}"),)
    return stub.Tunnel(iter(frames), metadata=metadata)


@pytest.mark.plane(tunnel_open_timeout_ms=3000)
async def test_only_the_jobs_host_may_call_back_and_frames_are_relayed(plane: JobPlane) -> None:
    host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), gpus=1)
    other = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), gpus=1)
    await host.start()
    try:
        job, _ = await running_job(plane, host)
        await other.start()  # after the placement: the job is on `host`
        stop = asyncio.Event()
        stub = tunnels_pb2_grpc.TunnelServiceStub(plane.channel)
        call = stub.Exec(exec_requests(job.job_id, stop), metadata=plane.auth(plane.consumer_key))
        command = (await next_command(host, "tunnel")).tunnel
        assert (command.job_id, command.attempt) == (job.job_id, 1)
        assert list(command.exec.command) == ["cat"]
        assert command.address == plane.address
        assert len(command.tunnel_id) >= 32

        stolen = relay_call(plane, other, [T.TunnelFrame(tunnel_id=command.tunnel_id)])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stolen.read()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        stub_relay = tunnels_pb2_grpc.TunnelRelayServiceStub(plane.channel)
        metadata = (("authorization", f"Bearer {host.credential}"),)
        daemon = stub_relay.Tunnel(metadata=metadata)  # type: ignore[call-arg]
        await daemon.write(T.TunnelFrame(tunnel_id=command.tunnel_id))
        first = await daemon.read()
        assert isinstance(first, T.TunnelFrame)
        assert first.data == b"ping"
        await daemon.write(T.TunnelFrame(data=b"pong"))
        await daemon.write(T.TunnelFrame(stderr=b"warn"))
        await daemon.write(T.TunnelFrame(exit_code=3))
        await daemon.done_writing()
        got = [r async for r in call]
        assert [r.WhichOneof("msg") for r in got] == ["stdout", "stderr", "exit_code"]
        assert (got[0].stdout, got[1].stderr, got[2].exit_code) == (b"pong", b"warn", 3)
        again = relay_call(plane, host, [T.TunnelFrame(tunnel_id=command.tunnel_id)])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await again.read()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # once only
        stop.set()
    finally:
        await host.close()
        await other.close()


@pytest.mark.plane(tunnel_open_timeout_ms=300)
async def test_no_call_back_is_unavailable(plane: JobPlane) -> None:
    host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), gpus=1)
    await host.start()
    try:
        job, _ = await running_job(plane, host)
        stop = asyncio.Event()
        stub = tunnels_pb2_grpc.TunnelServiceStub(plane.channel)
        call = stub.Exec(exec_requests(job.job_id, stop), metadata=plane.auth(plane.consumer_key))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "did not open the tunnel" in (caught.value.details() or "")
        stop.set()
    finally:
        await host.close()


@pytest.mark.databases("sqlite", "postgresql")
async def test_a_stored_tunnel_command_expires(plane: JobPlane) -> None:
    db, registry = plane.plane.db, plane.plane.registry
    assert db is not None
    assert registry is not None
    host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), auto_ack=False)
    await host.start()
    await host.stop_heartbeats()  # away: the command waits in the database
    try:
        message = registry_pb2.ControlMessage(tunnel=T.TunnelCommand(tunnel_id="t", port=80))
        async with db.transaction() as session:
            await CommandRepository(session).issue(host.host_id, message, utcnow())
        assert await registry.commands.close_moot() == 0  # fresh: kept
        async with db.transaction() as session:
            await session.execute(
                update(HostCommand).values(created_at=utcnow() - timedelta(seconds=31))
            )
        assert await registry.commands.close_moot() == 1
        async with db.read() as session:
            (row,) = (await session.scalars(select(HostCommand))).all()
        assert (row.kind, row.answer) == ("tunnel", "moot")
    finally:
        await host.close()


async def test_a_stopping_replica_ends_its_tunnels_with_unavailable(plane: JobPlane) -> None:
    host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), gpus=1)
    await host.start()
    try:
        job, _ = await running_job(plane, host)
        stop = asyncio.Event()
        stub = tunnels_pb2_grpc.TunnelServiceStub(plane.channel)
        call = stub.Exec(exec_requests(job.job_id, stop), metadata=plane.auth(plane.consumer_key))
        command = (await next_command(host, "tunnel")).tunnel
        relay = tunnels_pb2_grpc.TunnelRelayServiceStub(plane.channel)
        metadata = (("authorization", f"Bearer {host.credential}"),)
        daemon = relay.Tunnel(metadata=metadata)  # type: ignore[call-arg]
        await daemon.write(T.TunnelFrame(tunnel_id=command.tunnel_id))
        first = await daemon.read()
        assert isinstance(first, T.TunnelFrame)
        assert first.data == b"ping"  # paired and relaying
        tunnels = plane.plane.tunnels
        assert tunnels is not None
        tunnels.broker.close()  # what ControlPlane.stop does as its shutdown begins
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (caught.value.details() or "")
        stop.set()
    finally:
        await host.close()
