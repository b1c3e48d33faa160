"""Two control planes on one PostgreSQL: a daemon and the CLI given both addresses use the
first, and when that process is killed (-9) they carry on through the second: the host
stays online, a job runs to SUCCEEDED, the CLI answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from gpuplane.v1 import types_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.settings import DaemonSettings
from daemon.target import grpc_target
from devstack import DockerEngine, S3Server
from tests.controlplane.scheduler.planes import fleet, plane_options, until

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker, pytest.mark.postgres]
S = types_pb2


async def serving(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_several_addresses_become_one_ordered_target() -> None:
    assert grpc_target("cp.example:50051") == "cp.example:50051"
    assert grpc_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert grpc_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    assert grpc_target("localhost:7,127.0.0.1:8").startswith("ipv4:127.0.0.1:7,")
    with pytest.raises(ValueError, match="not HOST:PORT"):
        grpc_target("127.0.0.1:1,nope")


async def test_daemon_and_cli_fail_over_when_a_control_plane_dies(
    tmp_path: Path,
    pg_url: str,
    nats_server: Any,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = plane_options(pg_url, nats_server, s3_server, heartbeat_timeout_ms=4000)
    async with fleet(tmp_path, options, monkeypatch) as planes:
        stays = await planes.start("stays")
        doomed = planes.spawn("doomed")
        await until(lambda: serving(doomed.port), 30, "the spawned control plane serves")
        api = stays.api
        token = await api.token()
        addresses = f"127.0.0.1:{doomed.port},127.0.0.1:{stays.plane.port}"
        agent = Agent(
            DaemonSettings(
                control_plane=addresses,
                plaintext=True,
                registration_token=SecretStr(token),
                data_dir=tmp_path / "daemon",
                simulate_gpus="1xA100-80GB",
                gpu_device_requests="always",
                docker_host=docker_engine.base_url,
                heartbeat_interval_ms=200,
                reconnect_base_seconds=0.2,
                reconnect_max_seconds=1.0,
            )
        )
        await agent.start()
        assert stays.plane.registry is not None
        sessions = stays.plane.registry.streams
        try:
            # The first address answered: the host's Connect stream is on the doomed plane.
            await asyncio.sleep(1.0)
            assert not sessions.connected(agent.host_id)
            doomed.kill()
            moved = await until(
                lambda: sessions.connected(agent.host_id), 15, "the daemon reconnects"
            )
            print(f"\n[failover] the daemon's Connect moved to the other plane in {moved:.2f}s")
            job = await api.submit(
                image=test_image,
                command=["sh", "-c", "echo ok > /output/result.txt"],
                gpu_count=1,
            )
            done = await api.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED], timeout=60)
            assert done.host_id == agent.host_id

            gpuplane = Path(sys.executable).parent / "gpuplane"
            env = {k: v for k, v in os.environ.items() if not k.startswith("GPUPLANE_")}
            cli = await asyncio.to_thread(
                subprocess.run,
                [str(gpuplane), "--plaintext", "--addr", addresses, "--api-key", api.consumer_key]
                + ["--json", "jobs", "get", job.job_id],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 0, cli.stderr
            assert json.loads(cli.stdout)["state"] in ("JOB_STATE_SUCCEEDED", "SUCCEEDED")
        finally:
            await agent.stop()
