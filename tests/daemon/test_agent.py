"""The daemon Agent against the real control plane (in process), NATS, S3 and Docker engine:
register once, come online, run a job to SUCCEEDED with its results, cancel, restart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import cast

import docker
import nats
import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, registry_pb2, registry_pb2_grpc, types_pb2
from nats.aio.msg import Msg
from pydantic import SecretStr

from controlplane.db.base import utcnow
from daemon.agent import Agent
from daemon.executor import JobExecutor
from daemon.settings import DaemonSettings
from devstack import DockerEngine, NatsServer, S3Server
from messaging.subjects import DISPATCH_STREAM, dispatch_durable, dispatch_subject
from storage.grants import attempt_grant
from tests.harness import JobPlane

S = types_pb2
K = messaging_pb2.JobReportKind
pytestmark = [pytest.mark.timeout(60), pytest.mark.docker]


def daemon_settings(
    plane: JobPlane, token: str | None, data_dir: Path, s3: S3Server, engine: DockerEngine
) -> DaemonSettings:
    return DaemonSettings(
        control_plane=plane.address,
        plaintext=True,
        registration_token=SecretStr(token) if token else None,
        data_dir=data_dir,
        simulate_gpus="2xA100-80GB",
        gpu_device_requests="always",
        docker_host=engine.base_url,
        usage_report_interval_seconds=0.5,
        heartbeat_interval_ms=200,
        reconnect_max_seconds=1.0,
        location="test-lab",
    )


async def online_hosts(plane: JobPlane) -> list[types_pb2.Host]:
    stub = registry_pb2_grpc.RegistryServiceStub(plane.channel)
    request = registry_pb2.ListHostsRequest(states=[S.HOST_STATE_ONLINE])
    return list((await stub.ListHosts(request, metadata=plane.auth())).hosts)


async def wait_online(plane: JobPlane, host_id: str, timeout: float = 10.0) -> types_pb2.Host:
    async with asyncio.timeout(timeout):
        while True:
            for host in await online_hosts(plane):
                if host.host_id == host_id:
                    return host
            await asyncio.sleep(0.1)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


async def test_agent_runs_a_job_end_to_end_and_survives_a_restart(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    settings = daemon_settings(plane, token, tmp_path / "daemon", s3_server, docker_engine)
    agent = Agent(settings)
    await agent.start()
    try:
        assert os.stat(settings.host_file).st_mode & 0o777 == 0o600
        host_id = json.loads(settings.host_file.read_text())["host_id"]
        host = await wait_online(plane, host_id)
        assert host.simulated
        assert len(host.gpus) == 2
        assert host.location == "test-lab"

        script = "echo hello from the job; echo 42 > /output/answer.txt"
        job = await plane.submit(
            image=test_image, command=["sh", "-c", script], gpu_count=2, max_duration_seconds=60
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED])
        assert done.state == S.JOB_STATE_SUCCEEDED, done.state_reason
        assert done.exit_code == 0
        assert sorted(done.gpu_uuids) == sorted(g.uuid for g in host.gpus)
        results = await plane.jobs.GetResults(
            jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
        )
        objects = {o.path: o for o in results.objects}
        answer = await asyncio.to_thread(fetch, objects["output/answer.txt"].url)
        assert answer == b"42\n"
        assert hashlib.sha256(answer).hexdigest() == objects["output/answer.txt"].sha256
        stdout = await asyncio.to_thread(fetch, objects["logs/stdout"].url)
        assert stdout == b"hello from the job\n"
    finally:
        await agent.stop()

    # Same data dir, no token: the same host comes back from host.json.
    again = Agent(daemon_settings(plane, None, tmp_path / "daemon", s3_server, docker_engine))
    await again.start()
    try:
        assert again.host_id == host_id
        await wait_online(plane, host_id)
    finally:
        await again.stop()


async def test_cancel_through_the_control_plane_removes_the_container_fast(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    agent = Agent(daemon_settings(plane, token, tmp_path / "daemon", s3_server, docker_engine))
    await agent.start()
    try:
        await wait_online(plane, agent.host_id)
        job = await plane.submit(image=test_image, command=["sleep", "120"], gpu_count=1)
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        label = {"label": f"gpuplane.job={job.job_id}"}
        assert docker_client.containers.list(filters=label, sparse=True)
        started = time.monotonic()
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job.job_id, reason="changed my mind"),
            metadata=plane.auth(plane.consumer_key),
        )
        # sparse: the list does not inspect each container (one just removed fails that).
        while docker_client.containers.list(all=True, filters=label, sparse=True):
            assert time.monotonic() - started < 5, "container still there 5 s after cancel"
            await asyncio.sleep(0.1)
        cancelled = await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED], timeout=10)
        assert cancelled.usage.run_time_ms > 0
    finally:
        await agent.stop()


async def test_image_that_is_not_here_fails_the_job_with_the_reason(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
) -> None:
    token = await plane.token()
    agent = Agent(daemon_settings(plane, token, tmp_path / "daemon", s3_server, docker_engine))
    await agent.start()
    try:
        await wait_online(plane, agent.host_id)
        job = await plane.submit(image="gpuplane-test/absent:9", command=["true"], gpu_count=1)
        failed = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
        assert "image 'gpuplane-test/absent:9' is not on this host" in failed.state_reason
    finally:
        await agent.stop()


async def test_dispatch_poison_foreign_gpus_and_duplicates(
    plane: JobPlane,
    tmp_path: Path,
    nats_server: NatsServer,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    test_image: str,
) -> None:
    """Dispatches published straight to the host's subject (jobs the control plane does not
    know, so it ignores their reports): reports are watched with a plain subscription."""
    token = await plane.token()
    agent = Agent(daemon_settings(plane, token, tmp_path / "daemon", s3_server, docker_engine))
    await agent.start()
    client = await nats.connect(nats_server.url)
    reports: list[messaging_pb2.JobReport] = []

    async def collect(message: Msg) -> None:
        reports.append(messaging_pb2.JobReport.FromString(message.data))

    try:
        await client.subscribe("gpuplane.events.>", cb=collect)
        js = client.jetstream()
        subject = dispatch_subject(agent.host_id)
        await js.publish(subject, b"\xff not a protobuf", headers={"Nats-Msg-Id": "poison"})
        foreign = messaging_pb2.DispatchMessage(
            job_id="job-foreign", attempt=1, spec=S.JobSpec(image=test_image), gpu_uuids=["GPU-x"]
        )
        await js.publish(subject, foreign.SerializeToString())
        assert agent.inventory is not None
        twice = messaging_pb2.DispatchMessage(
            job_id="job-twice",
            attempt=1,
            tenant_id="t",
            spec=S.JobSpec(image=test_image, args=["sleep", "1"], max_duration_seconds=30),
            gpu_uuids=[agent.inventory.gpus[0].uuid],
            # Signed as the scheduler would: the daemon stores nothing without a grant.
            storage=attempt_grant(
                plane.plane.store,
                tenant_id="t",
                job_id="job-twice",
                attempt=1,
                inputs=[],
                deadline=utcnow() + timedelta(minutes=5),
                now=utcnow(),
            ),
        )
        await js.publish(subject, twice.SerializeToString(), headers={"Nats-Msg-Id": "a"})
        await js.publish(subject, twice.SerializeToString(), headers={"Nats-Msg-Id": "b"})
        async with asyncio.timeout(20):
            while not any(
                r.job_id == "job-twice" and r.kind == K.JOB_REPORT_KIND_FINISHED for r in reports
            ):
                await asyncio.sleep(0.1)
        by_job = {r.job_id for r in reports}
        assert by_job == {"job-foreign", "job-twice"}
        failed = [r for r in reports if r.job_id == "job-foreign"]
        assert [(r.kind, r.seq) for r in failed] == [(K.JOB_REPORT_KIND_FAILED_TO_START, 1)]
        assert failed[0].reason == "this host has no GPU GPU-x"
        twice_kinds = [r.kind for r in reports if r.job_id == "job-twice"]
        assert twice_kinds.count(K.JOB_REPORT_KIND_STARTING) == 1
        finished = [r for r in reports if r.kind == K.JOB_REPORT_KIND_FINISHED]
        assert [r.stop_reason for r in finished] == [
            messaging_pb2.STOP_REASON_COMPLETED
        ]  # stored with it
        assert agent.journal.entries() == []
        info = await js.consumer_info(DISPATCH_STREAM, dispatch_durable(agent.host_id))
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
    finally:
        await client.close()
        await agent.stop()


async def test_a_cancel_command_hands_its_reason_to_the_executor(tmp_path: Path) -> None:
    agent = Agent(DaemonSettings(data_dir=tmp_path))
    asked: list[tuple[int, str]] = []

    class Executor:
        async def cancel(self, reason: int, text: str) -> None:
            asked.append((reason, text))

    agent.executors[("job-1", 1)] = cast(JobExecutor, Executor())
    budget = messaging_pb2.StopReason.STOP_REASON_BUDGET_EXHAUSTED
    for cancel in (
        registry_pb2.CancelCommand(
            job_id="job-1", attempt=1, reason="budget_exhausted", stop_reason=budget
        ),
        registry_pb2.CancelCommand(job_id="job-1"),  # no reason: a plain cancel
        registry_pb2.CancelCommand(job_id="job-2", attempt=1),  # not running here
    ):
        await agent.on_command(registry_pb2.ControlMessage(cancel=cancel))
    await asyncio.gather(*agent._tasks)
    assert asked == [
        (budget, "budget_exhausted"),
        (messaging_pb2.StopReason.STOP_REASON_CANCELLED, ""),
    ]
