"""A registered daemon restarted with other --price-per-gpu-hour, --location and --label
flags makes them its host's (UpdateHost with its own credential), and refuses a bad price."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc

from daemon.agent import Agent
from daemon.identity import RegistrationError
from devstack import DockerEngine, S3Server
from tests.daemon.test_agent import daemon_settings, wait_online
from tests.harness import CREDIT, JobPlane

pytestmark = [pytest.mark.timeout(60), pytest.mark.docker]


async def test_a_restart_with_new_flags_updates_the_host(
    plane: JobPlane, tmp_path: Path, s3_server: S3Server, docker_engine: DockerEngine
) -> None:
    data_dir = tmp_path / "daemon"
    first = daemon_settings(plane, await plane.token(), data_dir, s3_server, docker_engine)
    agent = Agent(first.model_copy(update={"labels": {"tier": "bronze"}}))
    await agent.start()
    try:
        host_id = json.loads(first.host_file.read_text())["host_id"]
        host = await wait_online(plane, host_id)
        assert (host.location, dict(host.labels)) == ("test-lab", {"tier": "bronze"})
        assert host.price_per_gpu_hour_micro_credits == first.price_per_gpu_hour_micro_credits
    finally:
        await agent.stop()

    # Same data dir, no token: the same host, with the flags it restarts with.
    flags = {"price_per_gpu_hour_micro_credits": 3 * CREDIT, "location": "lab-2", "labels": {}}
    settings = daemon_settings(plane, None, data_dir, s3_server, docker_engine)
    again = Agent(settings.model_copy(update=flags))
    await again.start()
    try:
        assert again.host_id == host_id
        host = await wait_online(plane, host_id)
        assert host.price_per_gpu_hour_micro_credits == 3 * CREDIT
        assert (host.location, dict(host.labels)) == ("lab-2", {})
    finally:
        await again.stop()

    # A price the control plane refuses stops the start with the reason, the host unchanged.
    dear = settings.model_copy(update={"price_per_gpu_hour_micro_credits": 1000 * CREDIT})
    refused = Agent(dear)
    with pytest.raises(RegistrationError, match="price_per_gpu_hour_micro_credits"):
        await refused.start()
    await refused.stop()
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    request = registry_pb2.GetHostRequest(host_id=host_id)
    host = (await stub.GetHost(request, metadata=plane.auth())).host
    assert host.price_per_gpu_hour_micro_credits == 3 * CREDIT
