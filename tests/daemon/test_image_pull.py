"""Why an attempt could not start, on a real dockerd: the host's fault when the registry is
unreachable (IMAGE_PULL_FAILED, retried elsewhere), the job's when the registry says the image
does not exist (IMAGE_UNAVAILABLE); an input the host cannot fetch is the host's (HOST_ERROR)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from gpuplane.v1 import messaging_pb2, types_pb2

from daemon.executor import JobExecutor
from daemon.runtime import DockerRuntime, ImagePullFailed, ImageUnavailable
from daemon.settings import DaemonSettings
from devstack import DockerEngine
from storage.objects import ObjectStore
from tests.daemon.conftest import Reports, make_dispatch

K = messaging_pb2.JobReportKind
R = messaging_pb2.StopReason
pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def empty_registry(docker_engine: DockerEngine) -> Iterator[str]:
    """host:port of a registry on loopback that answers "manifest unknown" for everything
    (dockerd pulls from 127.0.0.0/8 over plain HTTP). A private dockerd has a network
    namespace of its own: the registry runs in it, its loopback brought up."""
    enter: list[str] = []
    if docker_engine.pid is not None:
        enter = ["nsenter", f"--net=/proc/{docker_engine.pid}/ns/net"]
        subprocess.run([*enter, "ip", "link", "set", "lo", "up"], check=True)
    process = subprocess.Popen(
        [*enter, sys.executable, "-m", "tests.daemon.fake_registry"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def closed_port() -> int:
    """A loopback port nothing listens on: a registry the host cannot reach."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_registry_is_the_hosts_fault(runtime: DockerRuntime) -> None:
    image = f"127.0.0.1:{closed_port()}/team/absent:1"
    with pytest.raises(ImagePullFailed) as caught:
        await runtime.ensure_image(image)
    message = str(caught.value)
    assert message.startswith(f"image '{image}' is not on this host and could not be pulled: ")
    assert "\n" not in message


async def test_an_image_the_registry_does_not_know_is_the_jobs_fault(
    runtime: DockerRuntime, empty_registry: str
) -> None:
    image = f"{empty_registry}/team/absent:1"
    with pytest.raises(ImageUnavailable) as caught:
        await runtime.ensure_image(image)
    assert str(caught.value).startswith(f"image '{image}' is not on this host")
    assert "not found" in str(caught.value) or "unknown" in str(caught.value)


async def _final_report(
    image: str, runtime: DockerRuntime, store: ObjectStore, settings: DaemonSettings
) -> tuple[messaging_pb2.JobReport, Reports]:
    reports = Reports()
    final = await JobExecutor(
        make_dispatch(image, args=["true"]),
        host_id="host-test",
        runtime=runtime,
        store=store,
        settings=settings,
        report=reports,
    ).run()
    return final, reports


async def test_the_executor_reports_a_pull_blocked_by_the_network_as_pull_failed(
    runtime: DockerRuntime, store: ObjectStore, settings: DaemonSettings
) -> None:
    final, reports = await _final_report(
        f"127.0.0.1:{closed_port()}/team/absent:1", runtime, store, settings
    )
    assert reports.kinds == ["JOB_REPORT_KIND_STARTING", "JOB_REPORT_KIND_FAILED_TO_START"]
    assert final.stop_reason == R.STOP_REASON_IMAGE_PULL_FAILED
    assert "could not be pulled" in final.reason


async def test_the_executor_reports_an_image_not_found_as_unavailable(
    runtime: DockerRuntime, store: ObjectStore, settings: DaemonSettings, empty_registry: str
) -> None:
    final, reports = await _final_report(
        f"{empty_registry}/team/absent:1", runtime, store, settings
    )
    assert reports.kinds == ["JOB_REPORT_KIND_STARTING", "JOB_REPORT_KIND_FAILED_TO_START"]
    assert final.stop_reason == R.STOP_REASON_IMAGE_UNAVAILABLE


async def test_an_input_the_host_cannot_fetch_is_the_hosts_fault(
    runtime: DockerRuntime, settings: DaemonSettings, test_image: str
) -> None:
    # Object storage unreachable from the host (no retries: the answer is the same).
    unreachable = ObjectStore(
        f"127.0.0.1:{closed_port()}",
        "key",
        "secret",
        bucket="gpuplane",
        http_client=urllib3.PoolManager(retries=False),
    )
    dispatch = make_dispatch(test_image, args=["true"], inputs=[types_pb2.JobInput(key="a.txt")])
    reports = Reports()
    final = await JobExecutor(
        dispatch,
        host_id="host-test",
        runtime=runtime,
        store=unreachable,
        settings=settings,
        report=reports,
    ).run()
    assert reports.kinds == ["JOB_REPORT_KIND_STARTING", "JOB_REPORT_KIND_FAILED_TO_START"]
    assert final.stop_reason == R.STOP_REASON_HOST_ERROR
    assert final.reason.startswith("input 'a.txt' could not be fetched: ")
