"""Fixtures: daemon settings on simulated GPUs and a DockerRuntime on the harness engine (the
fake libnvidia-ml.so.1 is a session fixture of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.gpus import GpuInventory, simulated_gpus
from daemon.runtime import LABEL_JOB, DockerRuntime
from daemon.settings import DaemonSettings
from devstack.docker_engine import remove_containers


@pytest.fixture
def settings(tmp_path: Path) -> DaemonSettings:
    return DaemonSettings(
        data_dir=tmp_path / "daemon",
        simulate_gpus="4xA100-80GB",
        gpu_device_requests="always",
        usage_report_interval_seconds=0.3,
        upload_retry_base_seconds=0.05,
    )


@pytest.fixture
def inventory(settings: DaemonSettings) -> GpuInventory:
    assert settings.simulate_gpus is not None
    return simulated_gpus(settings.simulate_gpus, settings.machine_id)


@pytest.fixture
def runtime(
    docker_client: docker.DockerClient, settings: DaemonSettings
) -> Iterator[DockerRuntime]:
    engine = DockerRuntime(docker_client, settings, host_id="host-test", simulated_gpus=True)
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
async def cleanup_containers(
    docker_client: docker.DockerClient,
) -> AsyncIterator[list[str]]:
    """Job ids whose containers are removed after the test, whatever happened."""
    job_ids: list[str] = []
    yield job_ids
    for job_id in job_ids:
        remove_containers(docker_client, f"{LABEL_JOB}={job_id}")


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


def make_dispatch(
    image: str,
    *,
    command: list[str] | None = None,
    args: list[str] | None = None,
    gpu_uuids: list[str] | None = None,
    max_duration_seconds: int = 30,
    job_id: str | None = None,
    **spec_fields: object,
) -> messaging_pb2.DispatchMessage:
    spec = types_pb2.JobSpec(
        image=image,
        command=command or [],
        args=args or [],
        gpu_count=len(gpu_uuids or []),
        max_duration_seconds=max_duration_seconds,
        **spec_fields,  # type: ignore[arg-type]
    )
    job = job_id or new_job_id()
    return messaging_pb2.DispatchMessage(
        job_id=job,
        attempt=1,
        tenant_id="tenant-1",
        spec=spec,
        gpu_uuids=gpu_uuids or [],
        results_prefix=f"jobs/{job}/1/",
        bucket="gpuplane",
    )


class Reports:
    """The report callback of an executor under test: keeps what it was given, in order."""

    def __init__(self) -> None:
        self.items: list[messaging_pb2.JobReport] = []
        self.changed = asyncio.Event()

    async def __call__(self, report: messaging_pb2.JobReport) -> None:
        self.items.append(report)
        self.changed.set()

    @property
    def kinds(self) -> list[str]:
        return [messaging_pb2.JobReportKind.Name(r.kind) for r in self.items]

    def without_usage(self) -> list[str]:
        return [k for k in self.kinds if k != "JOB_REPORT_KIND_USAGE"]

    async def wait_for(self, kind: int, timeout: float = 10.0) -> messaging_pb2.JobReport:
        async with asyncio.timeout(timeout):
            while True:
                for report in self.items:
                    if report.kind == kind:
                        return report
                self.changed.clear()
                await self.changed.wait()
