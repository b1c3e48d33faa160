"""The whole job path on real servers: control plane, NATS JetStream, S3, Docker engine and
real daemons (in process, and as `gpuplane daemon run` processes for kill -9). Every test
runs twice: plaintext, and with gRPC and NATS both over TLS requiring client certificates."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import pytest
from gpuplane.v1 import jobs_pb2, types_pb2
from pydantic import SecretStr

from daemon.agent import Agent
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from devstack.certs import TestCerts
from tests.harness import CREDIT, JobPlane, job_plane

S = types_pb2
PRICE = 2_000_000
pytestmark = [pytest.mark.timeout(90), pytest.mark.docker]


@pytest.fixture(params=["plaintext", "tls"])
async def plane(
    request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server
) -> AsyncIterator[JobPlane]:
    """Each test twice: plaintext, and TLS everywhere (gRPC with client certificates
    required, NATS requiring TLS and client certificates)."""
    tls: TestCerts | None = None
    if request.param == "tls":
        tls = request.getfixturevalue("test_certs")
        nats: NatsServer = request.getfixturevalue("nats_tls_server")
    else:
        nats = request.getfixturevalue("nats_server")
    async with job_plane(tmp_path / "cp", nats.url, s3_server, tls=tls) as running:
        yield running
        # After every test: the books balance and the consumer paid exactly the charges.
        await running.assert_ledger_consistent()
        charged = await total_charged(running)
        balance = await running.balance(running.consumer_tenant)
        assert balance.available_micro_credits + balance.held_micro_credits == (
            100 * CREDIT - charged
        )


async def total_charged(plane: JobPlane) -> int:
    listed = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(page_size=500), metadata=plane.auth(plane.consumer_key)
    )
    return sum(j.charged_micro_credits for j in listed.jobs)


def settings(
    plane: JobPlane, token: str, data_dir: Path, s3: S3Server, engine: DockerEngine, gpus: str
) -> DaemonSettings:
    return DaemonSettings(
        control_plane=plane.address,
        **plane.daemon_tls(),
        registration_token=SecretStr(token),
        data_dir=data_dir,
        simulate_gpus=gpus,
        gpu_device_requests="always",
        docker_host=engine.base_url,
        heartbeat_interval_ms=200,
        reconnect_max_seconds=1.0,
        price_per_gpu_hour_micro_credits=PRICE,
    )


@pytest.fixture
async def four_gpu_agent(
    plane: JobPlane, tmp_path: Path, s3_server: S3Server, docker_engine: DockerEngine
) -> AsyncIterator[Agent]:
    token = await plane.token()
    agent = Agent(settings(plane, token, tmp_path / "d4", s3_server, docker_engine, "4xA100-80GB"))
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


async def container_of(client: docker.DockerClient, job_id: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.containers.list(filters={"label": f"gpuplane.job={job_id}"})
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no running container for {job_id}")


async def test_gpus_by_uuid_disjoint_and_queued_until_free(
    plane: JobPlane,
    four_gpu_agent: Agent,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    script = "echo gpus=$NVIDIA_VISIBLE_DEVICES; sleep 600"
    submit = {"image": test_image, "command": ["sh", "-c", script], "gpu_count": 2}
    a = await plane.submit(**submit)
    b = await plane.submit(**submit)
    ja = await plane.wait_for(a.job_id, [S.JOB_STATE_RUNNING])
    jb = await plane.wait_for(b.job_id, [S.JOB_STATE_RUNNING])
    assert len(ja.gpu_uuids) == 2
    assert len(jb.gpu_uuids) == 2
    assert set(ja.gpu_uuids).isdisjoint(jb.gpu_uuids)
    for job in (ja, jb):
        container = await container_of(docker_client, job.job_id)
        container.reload()
        requests = container.attrs["HostConfig"]["DeviceRequests"]
        assert [sorted(r["DeviceIDs"]) for r in requests] == [sorted(job.gpu_uuids)]
        env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
        assert sorted(env["NVIDIA_VISIBLE_DEVICES"].split(",")) == sorted(job.gpu_uuids)

    c = await plane.submit(**submit)
    await asyncio.sleep(1.0)
    waiting = await plane.get(c.job_id)
    assert waiting.state == S.JOB_STATE_QUEUED
    assert "free matching GPUs" in waiting.state_reason

    await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=a.job_id), metadata=plane.auth(plane.consumer_key)
    )
    jc = await plane.wait_for(c.job_id, [S.JOB_STATE_RUNNING])
    assert set(jc.gpu_uuids) == set(ja.gpu_uuids)
    for job_id in (b.job_id, c.job_id):
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job_id), metadata=plane.auth(plane.consumer_key)
        )
    for job_id in (a.job_id, b.job_id, c.job_id):
        await plane.wait_for(job_id, [S.JOB_STATE_CANCELLED])


async def test_results_and_logs_and_end_states(
    plane: JobPlane, four_gpu_agent: Agent, test_image: str
) -> None:
    script = (
        "echo line one; echo oops >&2; sleep 1; echo line two; "
        "printf 'the answer\\n' > /output/result.txt"
    )
    job = await plane.submit(image=test_image, command=["sh", "-c", script], gpu_count=1)

    # Follow the logs while the job runs.
    follow = plane.jobs.StreamLogs(
        jobs_pb2.StreamLogsRequest(job_id=job.job_id, follow=True),
        metadata=plane.auth(plane.consumer_key),
    )
    live: list[tuple[int, bytes]] = []
    async with asyncio.timeout(30):
        async for chunk in follow:
            live.append((chunk.stream, chunk.data))
    done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED])
    assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
    stdout = b"".join(d for s, d in live if s == S.LOG_STREAM_STDOUT)
    assert stdout == b"line one\nline two\n"
    assert b"".join(d for s, d in live if s == S.LOG_STREAM_STDERR) == b"oops\n"

    results = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    objects = {o.path: o for o in results.objects}
    body = await asyncio.to_thread(fetch, objects["output/result.txt"].url)
    assert body == b"the answer\n"
    assert hashlib.sha256(body).hexdigest() == objects["output/result.txt"].sha256
    assert objects["output/result.txt"].size_bytes == len(body)

    # After the job: logs come from object storage.
    stored = plane.jobs.StreamLogs(
        jobs_pb2.StreamLogsRequest(job_id=job.job_id, stream=S.LOG_STREAM_STDOUT),
        metadata=plane.auth(plane.consumer_key),
    )
    assert b"".join([c.data async for c in stored]) == b"line one\nline two\n"

    failing = await plane.submit(image=test_image, command=["sh", "-c", "exit 7"], gpu_count=1)
    failed = await plane.wait_for(failing.job_id, [S.JOB_STATE_FAILED])
    assert failed.exit_code == 7
    assert failed.state_reason == "exit code 7"

    slow = await plane.submit(
        image=test_image, command=["sleep", "60"], gpu_count=1, max_duration_seconds=2
    )
    timed_out = await plane.wait_for(slow.job_id, [S.JOB_STATE_TIMED_OUT], timeout=30)
    # Charged for the time it ran (about the max duration), never more than its hold.
    assert 0 < timed_out.charged_micro_credits <= timed_out.hold_micro_credits
    run_ms = timed_out.attempts[-1]
    assert run_ms.charged_micro_credits == timed_out.charged_micro_credits


def start_daemon_process(
    plane: JobPlane, token: str, data_dir: Path, s3: S3Server, engine: DockerEngine
) -> subprocess.Popen[bytes]:
    gpuplane = Path(sys.executable).parent / "gpuplane"
    env = dict(os.environ, GPUPLANE_DAEMON_HEARTBEAT_INTERVAL_MS="200")
    for name, value in plane.daemon_tls().items():  # as a provider would configure it
        env[f"GPUPLANE_DAEMON_{name.upper()}"] = str(value).lower() if value is True else str(value)
    log = (data_dir.parent / f"{data_dir.name}.log").open("wb")
    return subprocess.Popen(
        [
            str(gpuplane),
            "daemon",
            "run",
            "--control-plane",
            plane.address,
            "--token",
            token,
            "--data-dir",
            str(data_dir),
            "--simulate-gpus",
            "1xA100-80GB",
            "--gpu-device-requests",
            "always",
            "--docker-host",
            engine.base_url,
            "--price-per-gpu-hour",
            "2",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def test_kill_9_daemon_moves_job_to_second_daemon_and_charges_once(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    first = start_daemon_process(plane, token, tmp_path / "first", s3_server, docker_engine)
    second: Agent | None = None
    first_host = ""
    try:
        job = await plane.submit(
            image=test_image,
            command=["sh", "-c", "sleep 3; echo done > /output/result.txt"],
            gpu_count=1,
            max_retries=1,
        )
        running = await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING], timeout=30)
        first_host = running.host_id
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = time.monotonic()

        second = Agent(
            settings(plane, token, tmp_path / "second", s3_server, docker_engine, "1xA100-80GB")
        )
        await second.start()
        while (await plane.get(job.job_id)).attempt < 2:
            await asyncio.sleep(0.05)
        lost_after = time.monotonic() - killed_at
        # Lost within the heartbeat timeout (1.5 s here) plus one liveness tick.
        assert lost_after < 1.5 + 1.0 + 1.0, lost_after
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED], timeout=30)
        assert done.attempt == 2
        assert done.host_id == second.host_id != first_host
        attempts = {a.attempt: a for a in done.attempts}
        assert attempts[1].charged_micro_credits == 0
        assert attempts[1].reason == "host lost (no heartbeat)"
        assert attempts[2].charged_micro_credits == done.charged_micro_credits > 0

        # The killed daemon's container of attempt 1 ran on; when that daemon comes back it
        # finds the attempt unknown to the control plane and removes the orphan.
        orphans = docker_client.api.containers(
            all=True, filters={"label": f"gpuplane.host={first_host}"}
        )
        first = start_daemon_process(plane, token, tmp_path / "first", s3_server, docker_engine)
        deadline = time.monotonic() + 30
        # The low-level list: containers.list() inspects each and fails on one just removed.
        while docker_client.api.containers(
            all=True, filters={"label": f"gpuplane.host={first_host}"}
        ):
            assert time.monotonic() < deadline, "the returning daemon left its orphan"
            assert first.poll() is None, "the returning daemon exited"
            await asyncio.sleep(0.1)
        print(f"\n[orphans] the returning daemon removed {len(orphans)} orphaned container(s)")
        after = await plane.get(job.job_id)
        assert (after.state, after.attempt, after.charged_micro_credits) == (
            S.JOB_STATE_SUCCEEDED,
            2,
            done.charged_micro_credits,
        )
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if second is not None:
            await second.stop()
        # The killed daemon's container is an orphan only a returning daemon would remove.
        if first_host:
            for container in docker_client.containers.list(
                all=True, filters={"label": f"gpuplane.host={first_host}"}
            ):
                container.remove(force=True)


async def test_daemon_restart_on_same_machine_is_same_host(
    plane: JobPlane, tmp_path: Path, s3_server: S3Server, docker_engine: DockerEngine
) -> None:
    token = await plane.token(max_uses=1)
    config = settings(plane, token, tmp_path / "same", s3_server, docker_engine, "1xL4")
    agent = Agent(config)
    await agent.start()
    host_id = agent.host_id
    await agent.stop()
    (tmp_path / "same" / "host.json").unlink()  # lost its credential: registers again
    again = Agent(config)
    await again.start()
    try:
        assert again.host_id == host_id  # same machine, same host; the token's one use stays
    finally:
        await again.stop()
