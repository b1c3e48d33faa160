"""Raw tunnels when the control plane serves TLS and requires client certificates: the data
port speaks TLS with the API's certificate, and both a raw port-forward and the gateway's
standing connections go over it (the daemon's TLS path, the client's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from gpuplane.v1 import tunnels_pb2, types_pb2
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.channel import ChannelSecurity
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from devstack.certs import TestCerts
from messaging.rawpath import connect
from tests.e2e.tunnelstack import TunnelStack
from tests.harness import job_plane

T = tunnels_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]
SCRIPT = "(nc -ll -p 7000 -e cat &) && echo hi > /tmp/hi && sleep 300"


async def test_raw_port_forward_and_standing_streams_over_tls(
    tmp_path: Path,
    test_certs: TestCerts,
    nats_tls_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> None:
    async with job_plane(tmp_path / "cp", nats_tls_server.url, s3_server, tls=test_certs) as plane:
        agent = Agent(
            DaemonSettings(
                control_plane=plane.address,
                **plane.daemon_tls(),
                registration_token=SecretStr(await plane.token()),
                data_dir=tmp_path / "daemon",
                simulate_gpus="1xA100-80GB",
                gpu_device_requests="always",
                docker_host=docker_engine.base_url,
                heartbeat_interval_ms=200,
            )
        )
        await agent.start()
        try:
            job = await plane.submit(image=test_image, command=["sh", "-c", SCRIPT], gpu_count=1)
            running = await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_RUNNING], 60)
            stack = TunnelStack(plane, running, agent)
            await _echo_over_raw_tls(stack, test_certs)
            tunnels = plane.plane.tunnels
            assert tunnels is not None
            for _ in range(2):  # the gateway's path: a standing TLS connection each time
                async with tunnels.open_stream(job.job_id, 7000) as (reader, writer):
                    writer.write(b"standing\n")
                    assert await asyncio.wait_for(reader.readexactly(9), 10) == b"standing\n"
            (pool,) = agent.tunnels.standing.values()
            assert pool.served == 2
        finally:
            await agent.stop()


async def _echo_over_raw_tls(stack: TunnelStack, certs: TestCerts) -> None:
    stop = asyncio.Event()

    async def requests() -> AsyncIterator[T.PortForwardRequest]:
        start = T.PortForwardStart(job_id=stack.job.job_id, port=7000, raw=True)
        yield T.PortForwardRequest(start=start)
        await stop.wait()

    for _ in range(100):  # nc listens a moment after the container starts
        call = stack.tunnels.PortForward(
            requests(), metadata=stack.plane.auth(stack.plane.consumer_key)
        )
        try:
            first = await call.read()
            break
        except grpc.aio.AioRpcError as error:  # "nothing listens" until nc does
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            await asyncio.sleep(0.1)
    assert isinstance(first, T.PortForwardResponse)
    assert first.raw_path.tls
    security = ChannelSecurity(
        ca_file=certs.ca_cert, cert_file=certs.client_cert, key_file=certs.client_key
    )
    reader, writer = await connect(
        first.raw_path.address, first.raw_path.token, security.raw_context()
    )
    payload = bytes(range(256)) * 4096  # 1 MiB both ways
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 20) == payload
    writer.close()
    stop.set()
    call.cancel()
