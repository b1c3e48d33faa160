"""A real daemon on the fake NVML library (one "H100") is probed: it runs the probe image
through its Docker runtime with the challenged GPU passed through, as a job runs, answers on
its Connect stream, and the control plane verifies it; only then does a job go there."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from devstack import DockerEngine, NatsServer, S3Server
from devstack.images import PROBE_TEST_IMAGE, build_probe_image, build_test_image
from tests.e2e.test_nvml_host import nvml_daemon
from tests.harness import JobPlane, job_plane

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]


@pytest.fixture
async def plane(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server, docker_engine: DockerEngine
) -> AsyncIterator[JobPlane]:
    await asyncio.to_thread(build_probe_image, docker_engine.client())
    await asyncio.to_thread(build_test_image, docker_engine.client())

    def configure(options: dict[str, object]) -> None:
        options.update(
            allow_unverified_by_default=False,
            probe_image=PROBE_TEST_IMAGE,
            probe_n=64,
            probe_rounds=4,
            probe_allowance_ms=30_000,
        )

    async with job_plane(tmp_path / "cp", nats_server.url, s3_server, configure=configure) as p:
        yield p


async def test_a_daemon_passes_its_probe_through_its_container_runtime(
    plane: JobPlane,
    tmp_path: Path,
    fake_nvml: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
) -> None:
    registry = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    state = tmp_path / "nvml.state"
    async with nvml_daemon(
        plane, tmp_path, fake_nvml, state, s3_server, docker_engine, gpus=1
    ) as process:
        async with asyncio.timeout(60):
            while True:
                assert process.poll() is None, f"the daemon exited with {process.returncode}"
                listed = await registry.ListHosts(
                    registry_pb2.ListHostsRequest(), metadata=plane.auth()
                )
                # Verified, or a probe failed ("probe N: why"), or the facts were refused.
                if any(h.verified or h.verification_reason.startswith(("probe", "GPU"))
                       for h in listed.hosts):  # fmt: skip
                    break
                await asyncio.sleep(0.2)
        (host,) = listed.hosts
        assert host.verified, host.verification_reason
        assert not host.simulated
        assert host.state == types_pb2.HOST_STATE_ONLINE
        assert [g.name for g in host.gpus] == ["NVIDIA H100 80GB HBM3"]
        offers = await registry.ListOffers(
            registry_pb2.ListOffersRequest(verified_only=True),
            metadata=plane.auth(plane.consumer_key),
        )
        assert [o.host_id for o in offers.offers] == [host.host_id]
        job = await plane.submit(gpu_count=1, args=["sh", "-c", "echo verified"])
        done = await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_SUCCEEDED], timeout=60)
        assert done.host_id == host.host_id
