"""Tunnels over TLS with client certificates required: the daemon reaches the control plane
as `localhost:PORT` while the tunnel command names `127.0.0.1:PORT`, so its call back goes over
a channel of its own to that address, with the same certificates, verified as its Connect is."""

from __future__ import annotations

from pathlib import Path

import pytest
from gpuplane.v1 import jobs_pb2, types_pb2
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from devstack.certs import TestCerts
from tests.e2e.tunnelstack import TunnelStack
from tests.harness import job_plane

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]


async def test_exec_over_tls_through_a_channel_to_the_named_replica(
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
                control_plane=f"localhost:{plane.plane.port}",
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
            job = await plane.submit(image=test_image, command=["sleep", "300"], gpu_count=1)
            running = await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_RUNNING], 60)
            stack = TunnelStack(plane, running, agent)
            out, err, code = await stack.exec(["sh", "-c", "echo over tls; exit 2"])
            assert (out, err, code) == (b"over tls\n", b"", 2)
            assert list(agent.tunnels._channels) == [plane.address]  # its own, kept
            await plane.jobs.CancelJob(
                jobs_pb2.CancelJobRequest(job_id=job.job_id),
                metadata=plane.auth(plane.consumer_key),
            )
            await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_CANCELLED], 30)
        finally:
            await agent.stop()
