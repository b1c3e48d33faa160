"""GPU utilisation survives a control-plane restart: a job runs on a `gpuplane daemon run`
process over the fake libnvidia-ml.so.1 reporting 73 % utilisation; while it runs the control
plane stops (writing what it measured) and starts again on the same database, the job
finishes there, and `jobs get`, `ledger usage` and `jobs efficiency` (gRPC and the CLI) all
show 73.0 %. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gpuplane.v1 import jobs_pb2, ledger_pb2, types_pb2
from pydantic import SecretStr

from controlplane.settings import Settings
from devstack import DockerEngine, NatsServer, S3Server, free_port
from gpuplane_cli.main import main
from tests.e2e.test_nvml_host import write_state
from tests.harness import JobPlane, job_plane, open_plane

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.docker,
    pytest.mark.databases("sqlite", "postgresql"),
]
S = types_pb2


async def start_daemon(
    plane: JobPlane,
    tmp_path: Path,
    fake_nvml: Path,
    state: Path,
    engine: DockerEngine,
) -> subprocess.Popen[bytes]:
    token = await plane.token()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(fake_nvml),
        "FAKE_NVML_STATE": str(state),
        "FAKE_NVML_GPUS": "2",
        "GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS": "200",
        "GPUPLANE_DAEMON_RECONNECT_MAX_SECONDS": "1",  # back soon after the restart
    }
    gpuplane = Path(sys.executable).parent / "gpuplane"
    argv = [str(gpuplane), "daemon", "run", "--plaintext", "--control-plane", plane.address]
    argv += ["--token", token, "--data-dir", str(tmp_path / "daemon")]
    argv += ["--docker-host", engine.base_url]  # no S3 key: each dispatch carries a grant
    argv += ["--price-per-gpu-hour", "2"]
    with (tmp_path / "daemon.log").open("wb") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(daemon: subprocess.Popen[bytes], log: Path) -> None:
    daemon.terminate()
    try:
        daemon.wait(timeout=20)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
    if daemon.returncode not in (0, -15):
        print(log.read_text(errors="replace"))


async def cli_json(capsys: pytest.CaptureFixture[str], address: str, key: str, *argv: str) -> Any:
    """`gpuplane --json ...` in a thread (it runs its own event loop); its parsed output."""
    environ = {"GPUPLANE_ADDR": address, "GPUPLANE_PLAINTEXT": "1"}
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["--api-key", key, "--json", *argv], environ)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


async def test_utilisation_is_the_same_in_jobs_get_and_usage_after_a_restart(
    tmp_path: Path,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
    fake_nvml: Path,
    capsys: pytest.CaptureFixture[str],
    database_url: str,
) -> None:
    state = tmp_path / "nvml.state"
    write_state(state, **{"0.util_gpu": 73, "1.util_gpu": 73, "0.temp": 50, "1.temp": 50})
    options: dict[str, Any] = {}

    def configure(given: dict[str, Any]) -> None:
        given.update(
            listen_addr=f"127.0.0.1:{free_port()}",  # the daemon finds the restarted one
            telemetry_interval_ms=300,
            # The restart must not outlast the liveness timeout (the host would be lost and
            # the job retried as a second attempt).
            heartbeat_timeout_ms=15_000,
            # Nothing is written on the interval: what the restart shows, the stop wrote.
            job_usage_flush_seconds=3600,
        )
        options.update(given)

    daemon: subprocess.Popen[bytes] | None = None
    try:
        async with job_plane(
            tmp_path / "cp", nats_server.url, s3_server, database_url, configure=configure
        ) as first:
            consumer = first.consumer_key
            options["bootstrap_admin_key"] = SecretStr(first.admin_key)  # the restart's key
            daemon = await start_daemon(first, tmp_path, fake_nvml, state, docker_engine)
            job = await first.submit(image=test_image, command=["sh", "-c", "sleep 8"], gpu_count=1)
            await first.wait_for(job.job_id, [S.JOB_STATE_RUNNING], timeout=60)
            measured = await measured_in_memory(first, job.job_id, at_least=3)
        # Stopped while the job runs, its flush interval far off: the stop wrote them.
        async with open_plane(Settings(**options)) as again:
            await compare_after_restart(again, consumer, job.job_id, measured, capsys)
    finally:
        if daemon is not None:
            stop(daemon, tmp_path / "daemon.log")


async def measured_in_memory(plane: JobPlane, job_id: str, at_least: int) -> int:
    """The samples this control plane has counted for the job's first attempt, once there are
    `at_least` (not written yet: its flush interval is an hour and the attempt runs)."""
    monitor = plane.plane.monitor
    assert monitor is not None
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        found = monitor.utilization.get(job_id, 1)
        if found is not None and found.samples >= at_least:
            assert found.mean_utilization_percent == 73
            return found.samples
        assert asyncio.get_running_loop().time() < deadline, "no telemetry counted for the job"
        await asyncio.sleep(0.1)


async def compare_after_restart(
    again: JobPlane, consumer: str, job_id: str, measured: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the first process measured is there after the restart; the job finishes on the
    restarted one (its daemon reconnects), and every view shows the same 73.0 %."""
    auth = again.auth(consumer)
    request = jobs_pb2.GetJobRequest(job_id=job_id)
    early = (await again.jobs.GetJob(request, metadata=auth)).job
    assert early.attempts[0].gpu_utilization_samples >= measured
    assert early.usage.avg_gpu_utilization_basis_points == 7300
    await again.wait_for(job_id, [S.JOB_STATE_SUCCEEDED], timeout=60)
    got = (await again.jobs.GetJob(request, metadata=auth)).job
    assert [a.attempt for a in got.attempts] == [1]  # the same attempt, across the restart
    assert got.usage.avg_gpu_utilization_basis_points == 7300
    assert got.usage.avg_gpu_utilization_percent == 73
    (row,) = (await again.ledger.GetUsage(ledger_pb2.GetUsageRequest(), metadata=auth)).rows
    assert row.job_id == job_id
    assert row.avg_gpu_utilization_basis_points == 7300
    assert row.avg_gpu_utilization_percent == 73
    assert row.utilized_gpu_time_ms == (row.gpu_time_ms * 73 + 50) // 100
    efficiency = await again.jobs.GetJobEfficiency(
        jobs_pb2.GetJobEfficiencyRequest(job_id=job_id), metadata=auth
    )
    assert efficiency.total.avg_gpu_utilization_basis_points == 7300
    charged = efficiency.total.charged_micro_credits
    assert charged > 0
    assert efficiency.total.idle_micro_credits == charged - (2 * charged * 7300 + 10_000) // 20_000
    # The CLI's JSON, as a user compares them.
    shown = await cli_json(capsys, again.address, consumer, "jobs", "get", job_id)
    listed = await cli_json(capsys, again.address, consumer, "ledger", "usage")
    (listed_row,) = listed["rows"]
    for field in ("avg_gpu_utilization_basis_points", "avg_gpu_utilization_percent"):
        assert shown["usage"][field] == listed_row[field]
    assert shown["usage"]["avg_gpu_utilization_basis_points"] == 7300
