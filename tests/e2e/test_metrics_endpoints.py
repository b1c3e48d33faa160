"""Both processes' /metrics, real: a `gpuplane daemon run` on the fake libnvidia-ml.so.1 with
--metrics-addr runs a job for a real control plane; promtool accepts both texts, the daemon's
series name each GPU's model and the job on it, and record the report and upload it made; the
control plane's carry the ledger's totals; and every metric name the dashboards and alert
rules under deploy/ read is one of the two processes exports."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from gpuplane.v1 import types_pb2

from devstack import DockerEngine, NatsServer, S3Server
from devstack.ports import free_port
from tests.deploy.formats import DEPLOY
from tests.deploy.promql import (
    dashboard_exprs,
    exported_names,
    metric_names,
    promtool,
    rule_exprs,
)
from tests.e2e.test_nvml_host import H100, RTX, online_host, write_state
from tests.harness import CREDIT, JobPlane, job_plane
from tests.serving import stop_process

pytestmark = [pytest.mark.timeout(120), pytest.mark.docker]

INTERVAL_MS = 300
MODELS = {H100: "NVIDIA H100 80GB HBM3", RTX: "NVIDIA GeForce RTX 4090"}


@pytest.fixture
async def plane(
    tmp_path: Path, nats_server: NatsServer, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    def configure(options: dict[str, object]) -> None:
        options["telemetry_interval_ms"] = INTERVAL_MS

    async with job_plane(tmp_path / "cp", nats_server.url, s3_server, configure=configure) as p:
        yield p


@pytest.fixture
async def daemon_metrics(
    plane: JobPlane, tmp_path: Path, fake_nvml: Path, docker_engine: DockerEngine
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """A daemon on the fake NVML library (an H100 and an RTX 4090) serving /metrics; yields
    its /metrics URL and process. Jobs get no device requests (the test engine has no GPU
    runtime)."""
    state = tmp_path / "nvml.state"
    write_state(state, **{"0.temp": 40, "1.temp": 35})
    port = free_port()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(fake_nvml),
        "FAKE_NVML_STATE": str(state),
        "FAKE_NVML_GPUS": "2",
        "GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS": "200",
    }
    log_path = tmp_path / "daemon.log"
    command = [
        str(Path(sys.executable).parent / "gpuplane"),
        "daemon",
        "run",
        "--plaintext",
        "--control-plane",
        plane.address,
        "--token",
        await plane.token(),
        "--data-dir",
        str(tmp_path / "daemon"),
        "--docker-host",
        docker_engine.base_url,
        "--gpu-device-requests",
        "never",
        "--metrics-addr",
        f"127.0.0.1:{port}",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}/metrics", process
    finally:
        stop_process(process)
        if process.returncode not in (0, -15):
            print(log_path.read_text(errors="replace"))


async def scrape(url: str) -> str:
    def read() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(read)


def value(text: str, name: str, **labels: str) -> float | None:
    """The sample `name` whose labels include `labels`; None when there is none."""
    for line in text.splitlines():
        match = re.fullmatch(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


async def until(url: str, check: Callable[[str], bool], what: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = await scrape(url)
        if check(text):
            return text
        assert time.monotonic() < deadline, f"{what} not in {url} after {timeout}s:\n{text}"
        await asyncio.sleep(0.1)


def assert_promtool_accepts(text: str, what: str) -> None:
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, f"{what}: {checked.stdout}{checked.stderr}"
    assert checked.stdout.strip() == "", f"{what}: {checked.stdout}"


async def test_both_metrics_endpoints_pass_promtool_and_serve_what_deploy_reads(
    plane: JobPlane,
    daemon_metrics: tuple[str, subprocess.Popen[bytes]],
    test_image: str,
) -> None:
    daemon_url, process = daemon_metrics
    host = await online_host(plane, process)
    await check_idle_daemon(daemon_url, host.host_id)
    job = await check_a_running_job(plane, daemon_url, test_image)

    # It finishes: the upload and the reports are timed, the container is gone.
    done = await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_SUCCEEDED], timeout=30)
    daemon_text = await until(
        daemon_url,
        lambda t: value(t, "gpuplane_daemon_containers") == 0,
        "no container",
    )
    assert value(daemon_text, "gpuplane_daemon_upload_seconds_count", outcome="stored") == 1
    finished = value(daemon_text, "gpuplane_daemon_report_publish_seconds_count", kind="finished")
    assert finished == 1
    assert value(daemon_text, "gpuplane_daemon_report_publish_seconds_count", kind="running")
    assert value(daemon_text, "gpuplane_daemon_attempts", step="running") == 0

    cp_text = await check_control_plane(plane, done.charged_micro_credits)
    assert_promtool_accepts(daemon_text, "the daemon's /metrics")
    assert_promtool_accepts(cp_text, "the control plane's /metrics")
    check_deploy_reads_exported_names(daemon_text, cp_text)


async def check_idle_daemon(daemon_url: str, host_id: str) -> None:
    labels = {"host": host_id, "model": MODELS[H100], "gpu": H100}
    # The host is ONLINE once its hello is written, a moment before the daemon reads the
    # HelloAck that makes it count as connected: wait for both.
    idle = await until(
        daemon_url,
        lambda t: (
            value(t, "gpuplane_daemon_gpu_temperature_celsius", **labels, job_id="") == 40
            and value(t, "gpuplane_daemon_control_plane_connected") == 1
        ),
        "the H100's temperature, and the Connect stream acknowledged",
    )
    assert value(idle, "gpuplane_daemon_nats_connected") == 1
    assert value(idle, "gpuplane_daemon_gpu_quarantined", **labels) == 0
    assert value(idle, "gpuplane_daemon_attempts", step="running") == 0
    assert value(idle, "gpuplane_daemon_build_info") == 1


async def check_a_running_job(plane: JobPlane, daemon_url: str, image: str) -> types_pb2.Job:
    """A job runs: its GPU's series carry its id, and the daemon counts its container."""
    script = "sleep 2; echo done > /output/result.txt"
    job = await plane.submit(image=image, command=["sh", "-c", script], gpu_count=1)
    await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_RUNNING])
    running = await until(
        daemon_url,
        lambda t: any(
            value(t, "gpuplane_daemon_gpu_utilization_percent", gpu=gpu, job_id=job.job_id)
            is not None
            for gpu in MODELS
        ),
        "the job's GPU series",
    )
    assert value(running, "gpuplane_daemon_attempts", step="running") == 1
    assert value(running, "gpuplane_daemon_containers") == 1
    return job


async def check_control_plane(plane: JobPlane, charged: int) -> str:
    """The ledger's totals once the refresher has read the settled job; the RPC metrics."""
    assert charged > 0
    cp_url = f"http://127.0.0.1:{plane.plane.metrics_port}/metrics"
    total = "gpuplane_ledger_transferred_micro_credits_total"

    def settled(text: str) -> bool:
        # What the job was charged: the provider's share (charge) and the platform's (fee);
        # and its hold resolved.
        moved = (value(text, total, kind="charge") or 0) + (value(text, total, kind="fee") or 0)
        return moved == charged and value(text, "gpuplane_ledger_holds_outstanding") == 0

    cp_text = await until(cp_url, settled, "the job's charge, fee and resolved hold")
    assert (value(cp_text, total, kind="fee") or 0) > 0
    assert value(cp_text, total, kind="deposit") == 100 * CREDIT
    assert value(cp_text, total, kind="payout") == 0
    assert value(cp_text, "gpuplane_ledger_imbalance_micro_credits") == 0
    balance = "gpuplane_ledger_balance_micro_credits"
    assert value(cp_text, balance, kind="external") == -100 * CREDIT
    assert value(cp_text, "gpuplane_build_info") == 1
    assert value(cp_text, "process_resident_memory_bytes")
    # Connect is a stream: in its own histogram once it ends, never in the unary one.
    connect = {"grpc_service": "gpuplane.v1.RegistryService", "grpc_method": "Connect"}
    assert value(cp_text, "grpc_server_started_total", **connect, grpc_type="bidi_stream")
    assert value(cp_text, "grpc_server_handling_seconds_count", **connect) is None
    return cp_text


def check_deploy_reads_exported_names(daemon_text: str, cp_text: str) -> None:
    # deploy/README.md's "What to monitor" names every metric the daemon exports.
    readme = (DEPLOY / "README.md").read_text()
    families = {line.split()[2] for line in daemon_text.splitlines() if line.startswith("# TYPE ")}
    undocumented = {n for n in families if not n.endswith("_created") and f"`{n}`" not in readme}
    assert undocumented == set()
    # Every metric the dashboards and the alert rules read is exported by one of the two.
    exported = exported_names(daemon_text) | exported_names(cp_text)
    used = [(where, name) for where, expr in [*dashboard_exprs(), *rule_exprs()]
            for name in metric_names(expr)]  # fmt: skip
    assert len(used) > 50
    missing = sorted({f"{where}: {name}" for where, name in used if name not in exported})
    assert not missing, "read by deploy/ but exported by neither process:\n" + "\n".join(missing)
