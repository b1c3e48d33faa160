"""On real servers and real daemons: an image pull blocked by the host's network fails the
attempt as the host's fault (IMAGE_PULL_FAILED), and the job is retried on another host at
no charge for the failed attempt."""

from __future__ import annotations

import socket
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.ledger.service import charge_for
from daemon.agent import Agent
from devstack import DockerEngine, S3Server
from tests.e2e.test_job_path import PRICE, settings
from tests.harness import CREDIT, JobPlane

S = types_pb2
pytestmark = [pytest.mark.timeout(90), pytest.mark.docker]


def unreachable_image() -> str:
    """An image on a registry at a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}/team/absent:1"


async def test_an_image_pull_blocked_by_the_network_is_retried_elsewhere_at_no_charge(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    image = unreachable_image()
    first = Agent(
        settings(
            plane, await plane.token(), tmp_path / "a", s3_server, docker_engine, "1xA100-80GB"
        )
    )
    second = Agent(
        settings(
            plane, await plane.token(), tmp_path / "b", s3_server, docker_engine, "1xA100-80GB"
        )
    )
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    await first.start()
    await second.start()
    try:
        # The second host takes nothing yet: the job goes to the first, whose pull fails.
        await registry.DrainHost(
            registry_pb2.DrainHostRequest(host_id=second.host_id), metadata=plane.auth()
        )
        job = await plane.submit(image=image, command=["sh", "-c", "echo ran"], gpu_count=1)
        # Requeued; it waits for another host than the one that failed it (the second is
        # registered, so it could), though the first is free again.
        requeued = await plane.wait_for(job.job_id, [S.JOB_STATE_QUEUED], timeout=30)
        while requeued.attempt < 2:
            requeued = await plane.wait_for(job.job_id, [S.JOB_STATE_QUEUED], timeout=30)
        # The second host has the image (as if its network reached the registry).
        docker_client.images.get(test_image).tag(image.rsplit(":", 1)[0], "1")
        await registry.UndrainHost(
            registry_pb2.UndrainHostRequest(host_id=second.host_id), metadata=plane.auth()
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED], timeout=45)
    finally:
        await first.stop()
        await second.stop()
        try:
            docker_client.images.remove(image)
        except docker.errors.ImageNotFound:
            pass
    attempts = {a.attempt: a for a in done.attempts}
    assert attempts[1].host_id == first.host_id
    assert attempts[1].reason.startswith(f"image pull failed on the host: image '{image}'")
    assert attempts[1].charged_micro_credits == 0
    assert attempts[2].host_id == second.host_id
    assert done.charged_micro_credits == attempts[2].charged_micro_credits
    assert done.charged_micro_credits <= charge_for(PRICE, 1, done.usage.run_time_ms + 1000)
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.held_micro_credits == 0
    assert consumer.available_micro_credits == 100 * CREDIT - done.charged_micro_credits
    await plane.assert_ledger_consistent()
