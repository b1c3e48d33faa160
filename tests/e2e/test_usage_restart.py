"""GPU utilisation survives a control-plane restart: a job runs on a `gpuplane daemon run`
process over the fake libnvidia-ml.so.1 reporting 73 % utilisation, the control plane stops
(writing what it measured) and starts again on the same database, and `jobs get`,
`ledger usage` and `jobs efficiency` (gRPC and the CLI) all show 73.0 %."""

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

pytestmark = [pytest.mark.timeout(150), pytest.mark.docker]
S = types_pb2


async def start_daemon(
    plane: JobPlane,
    tmp_path: Path,
    fake_nvml: Path,
    state: Path,
    s3: S3Server,
    engine: DockerEngine,
) -> subprocess.Popen[bytes]:
    token = await plane.token()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(fake_nvml),
        "FAKE_NVML_STATE": str(state),
        "FAKE_NVML_GPUS": "2",
        "GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS": "200",
    }
    gpuplane = Path(sys.executable).parent / "gpuplane"
    argv = [str(gpuplane), "daemon", "run", "--plaintext", "--control-plane", plane.address]
    argv += ["--token", token, "--data-dir", str(tmp_path / "daemon")]
    argv += ["--docker-host", engine.base_url, "--s3-endpoint", s3.endpoint]
    argv += ["--s3-access-key", s3.access_key, "--s3-secret-key", s3.secret_key]
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
) -> None:
    state = tmp_path / "nvml.state"
    write_state(state, **{"0.util_gpu": 73, "1.util_gpu": 73, "0.temp": 50, "1.temp": 50})
    options: dict[str, Any] = {}

    def configure(given: dict[str, Any]) -> None:
        given.update(
            listen_addr=f"127.0.0.1:{free_port()}",  # the daemon finds the restarted one
            telemetry_interval_ms=300,
            # Nothing is written before the stop: what the restart shows, the stop wrote.
            job_usage_flush_seconds=3600,
        )
        options.update(given)

    async with job_plane(tmp_path / "cp", nats_server.url, s3_server, configure=configure) as p:
        consumer = p.consumer_key
        options["bootstrap_admin_key"] = SecretStr(p.admin_key)  # the restart logs in with it
        daemon = await start_daemon(p, tmp_path, fake_nvml, state, s3_server, docker_engine)
        try:
            job = await p.submit(image=test_image, command=["sh", "-c", "sleep 4"], gpu_count=1)
            done = await p.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED], timeout=90)
        finally:
            stop(daemon, tmp_path / "daemon.log")
        assert done.usage.gpu_time_ms > 0
        assert done.usage.avg_gpu_utilization_basis_points == 0  # measured, not yet written

    async with open_plane(Settings(**options)) as again:
        auth = again.auth(consumer)
        got = (
            await again.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=auth)
        ).job
        (attempt,) = got.attempts
        assert attempt.gpu_utilization_samples >= 3, attempt
        assert got.usage.avg_gpu_utilization_basis_points == 7300
        assert got.usage.avg_gpu_utilization_percent == 73
        (row,) = (await again.ledger.GetUsage(ledger_pb2.GetUsageRequest(), metadata=auth)).rows
        assert row.job_id == job.job_id
        assert row.avg_gpu_utilization_basis_points == 7300
        assert row.avg_gpu_utilization_percent == 73
        assert row.utilized_gpu_time_ms == (row.gpu_time_ms * 73 + 50) // 100
        efficiency = await again.jobs.GetJobEfficiency(
            jobs_pb2.GetJobEfficiencyRequest(job_id=job.job_id), metadata=auth
        )
        assert efficiency.total.avg_gpu_utilization_basis_points == 7300
        charged = got.charged_micro_credits
        assert (
            efficiency.total.idle_micro_credits == charged - (2 * charged * 7300 + 10_000) // 20_000
        )
        # The CLI's JSON, as a user compares them.
        shown = await cli_json(capsys, again.address, consumer, "jobs", "get", job.job_id)
        listed = await cli_json(capsys, again.address, consumer, "ledger", "usage")
        (listed_row,) = listed["rows"]
        for field in ("avg_gpu_utilization_basis_points", "avg_gpu_utilization_percent"):
            assert shown["usage"][field] == listed_row[field]
        assert shown["usage"]["avg_gpu_utilization_basis_points"] == 7300
