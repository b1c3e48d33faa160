"""Tunnel frames of the largest size: a 256 KiB frame crosses the control plane whole, either
way; one byte more is refused (INVALID_ARGUMENT naming the field from the client, the tunnel
broken from the daemon), so every hop's memory stays bounded by frames of that size."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from gpuplane.v1 import tunnels_pb2, tunnels_pb2_grpc

from controlplane.tunnels.broker import MAX_CHUNK
from tests.controlplane.registry.test_commands import next_command, running_job
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import JobPlane

T = tunnels_pb2
pytestmark = [pytest.mark.timeout(60)]


async def forward_requests(
    job_id: str, data: bytes, stop: asyncio.Event
) -> AsyncIterator[T.PortForwardRequest]:
    yield T.PortForwardRequest(start=T.PortForwardStart(job_id=job_id, port=8080))
    yield T.PortForwardRequest(data=data)
    await stop.wait()


async def daemon_call(plane: JobPlane, host: ScriptedHost, tunnel_id: str) -> object:
    stub = tunnels_pb2_grpc.TunnelRelayServiceStub(plane.channel)
    metadata = (("authorization", f"Bearer {host.credential}"),)
    call = stub.Tunnel(metadata=metadata)  # type: ignore[call-arg]
    await call.write(T.TunnelFrame(tunnel_id=tunnel_id))
    return call


@pytest.mark.plane(tunnel_open_timeout_ms=3000)
async def test_the_largest_frame_crosses_whole_and_one_byte_more_is_refused(
    plane: JobPlane,
) -> None:
    assert MAX_CHUNK == 256 * 1024
    host = ScriptedHost(plane.channel, plane.nats_url, await plane.token(), gpus=1)
    await host.start()
    try:
        job, _ = await running_job(plane, host)
        stub = tunnels_pb2_grpc.TunnelServiceStub(plane.channel)
        consumer = plane.auth(plane.consumer_key)

        # The largest frame, both ways, in one piece each.
        stop = asyncio.Event()
        up = bytes(range(256)) * (MAX_CHUNK // 256)
        call = stub.PortForward(forward_requests(job.job_id, up, stop), metadata=consumer)
        command = (await next_command(host, "tunnel")).tunnel
        assert command.port == 8080
        daemon = await daemon_call(plane, host, command.tunnel_id)
        first = await daemon.read()  # type: ignore[attr-defined]
        assert first.data == up
        down = up[::-1]
        await daemon.write(T.TunnelFrame(data=down))  # type: ignore[attr-defined]
        response = await call.read()
        assert isinstance(response, T.PortForwardResponse)
        assert response.data == down

        # From the daemon, one byte over: the tunnel breaks, the client hears UNAVAILABLE.
        await daemon.write(T.TunnelFrame(data=down + b"x"))  # type: ignore[attr-defined]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stop.set()

        # From the client, one byte over: INVALID_ARGUMENT naming the field.
        stop = asyncio.Event()
        call = stub.PortForward(forward_requests(job.job_id, up + b"x", stop), metadata=consumer)
        command = (await next_command(host, "tunnel")).tunnel
        daemon = await daemon_call(plane, host, command.tunnel_id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(call.read(), 10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "data" in (caught.value.details() or "")
        assert str(MAX_CHUNK) in (caught.value.details() or "")
        stop.set()
    finally:
        await host.close()
