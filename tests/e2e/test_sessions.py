"""Interactive sessions on real servers and a real daemon with Docker and the busybox image:
create → RUNNING with a TTY and the SSH key in the container; extend then done, charged
exactly the time it ran; expiry (warned first) destroys the container; a lost daemon loses
the session; a container no control plane knows is destroyed by the periodic resync; a
restarted daemon adopts a session with its extended deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import jobs_pb2, sessions_pb2, sessions_pb2_grpc, types_pb2

from controlplane.ledger.transfers import charge_for
from daemon.agent import Agent
from devstack import DockerEngine, S3Server
from tests.controlplane.scheduler.planes import until
from tests.e2e.test_job_path import PRICE, container_of, settings
from tests.harness import CREDIT, JobPlane

S = types_pb2
pytestmark = [pytest.mark.timeout(60), pytest.mark.docker]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEnyiHyW0lHc+ZtFDYeGfnWCTZh2Hp3ojQ0Q0aFxT4pW me@laptop"


@pytest.fixture
async def agent(
    plane: JobPlane, tmp_path: Path, s3_server: S3Server, docker_engine: DockerEngine
) -> AsyncIterator[Agent]:
    token = await plane.token()
    running = Agent(settings(plane, token, tmp_path / "d", s3_server, docker_engine, "2xA100-80GB"))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def stub(plane: JobPlane) -> sessions_pb2_grpc.SessionServiceAsyncStub:
    return sessions_pb2_grpc.SessionServiceStub(plane.channel)


async def create(
    plane: JobPlane, image: str, seconds: int, ssh_public_keys: Sequence[str] = ()
) -> str:
    request = sessions_pb2.CreateSessionRequest(
        spec=S.JobSpec(image=image, gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE),
        duration_seconds=seconds,
        ssh_public_keys=ssh_public_keys,
    )
    reply = await stub(plane).CreateSession(request, metadata=plane.auth(plane.consumer_key))
    return str(reply.session.session_id)


async def get(plane: JobPlane, session_id: str) -> sessions_pb2.Session:
    request = sessions_pb2.GetSessionRequest(session_id=session_id)
    reply = await stub(plane).GetSession(request, metadata=plane.auth(plane.consumer_key))
    return reply.session


async def wait_for(
    plane: JobPlane, session_id: str, state: int, timeout: float = 20
) -> sessions_pb2.Session:
    deadline = time.monotonic() + timeout
    while (current := await get(plane, session_id)).state != state:
        assert time.monotonic() < deadline, f"{session_id}: {current}"
        await asyncio.sleep(0.05)
    return current


async def gone(client: docker.DockerClient, label: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    # sparse: no inspect of each listed container, which fails on one removed meanwhile.
    while client.containers.list(all=True, filters={"label": label}, sparse=True):
        assert time.monotonic() < deadline, f"a container labelled {label} is still there"
        await asyncio.sleep(0.05)


async def charged_exactly_its_run_time(plane: JobPlane, ended: sessions_pb2.Session) -> None:
    """Charged price × GPUs × the run time the daemon reported (capped at its duration),
    and nothing held any more."""
    job = await plane.get(ended.session_id)
    assert len(job.attempts) == 1
    assert job.usage.run_time_ms == ended.run_time_ms
    run_ms = min(ended.run_time_ms, ended.duration_seconds * 1000)
    assert run_ms > 0
    assert ended.charged_micro_credits == charge_for(PRICE, 1, run_ms)
    balance = await plane.balance(plane.consumer_tenant)
    assert balance.held_micro_credits == 0
    assert balance.available_micro_credits == 100 * CREDIT - ended.charged_micro_credits
    await plane.assert_ledger_consistent()


async def reasons(plane: JobPlane, session_id: str) -> list[str]:
    request = jobs_pb2.WatchJobRequest(job_id=session_id)
    events = plane.jobs.WatchJob(request, metadata=plane.auth(plane.consumer_key))
    return [event.reason async for event in events]


async def test_a_session_runs_with_a_tty_and_its_key_then_is_extended_and_done(
    plane: JobPlane, agent: Agent, docker_client: docker.DockerClient, test_image: str
) -> None:
    session_id = await create(plane, test_image, 120, ssh_public_keys=[KEY])
    assert session_id.startswith("ses_")
    running = await wait_for(plane, session_id, S.JOB_STATE_RUNNING)
    assert running.hold_micro_credits == charge_for(PRICE, 1, 120_000)
    assert running.expires_at.ToSeconds() - running.started_at.ToSeconds() == 120
    container = await container_of(docker_client, session_id)
    assert (container.attrs["Config"]["Tty"], container.attrs["Config"]["OpenStdin"]) == (
        True,
        True,
    )
    assert container.attrs["Config"]["Cmd"] == ["sh"]  # the image's default command
    await asyncio.sleep(0.5)
    container.reload()
    assert container.status == "running", "sh on a terminal with open stdin stays up"
    keys = container.exec_run(["cat", "/root/.ssh/authorized_keys"], user="0").output
    assert keys.decode() == KEY + "\n"

    held = (await plane.balance(plane.consumer_tenant)).held_micro_credits
    request = sessions_pb2.ExtendSessionRequest(session_id=session_id, duration_seconds=60)
    reply = await stub(plane).ExtendSession(request, metadata=plane.auth(plane.consumer_key))
    more = charge_for(PRICE, 1, 180_000) - charge_for(PRICE, 1, 120_000)
    assert reply.session.duration_seconds == 180
    assert reply.session.hold_micro_credits == charge_for(PRICE, 1, 180_000)
    assert reply.session.expires_at.ToSeconds() - running.expires_at.ToSeconds() == 60
    assert (await plane.balance(plane.consumer_tenant)).held_micro_credits == held + more
    deadline = agent.deadlines[(session_id, 1)]
    async with asyncio.timeout(10):  # the ExtendCommand reaches the daemon's own deadline
        while deadline.seconds != 180:
            await asyncio.sleep(0.05)

    done = sessions_pb2.FinishSessionRequest(session_id=session_id)
    await stub(plane).FinishSession(done, metadata=plane.auth(plane.consumer_key))
    ended = await wait_for(plane, session_id, S.JOB_STATE_SUCCEEDED)
    assert ended.state_reason == "done: ended by the user"
    assert ended.HasField("destroyed_at")
    assert ended.destroyed_at.ToDatetime() >= ended.started_at.ToDatetime()
    await gone(docker_client, f"gpuplane.job={session_id}")
    await charged_exactly_its_run_time(plane, ended)
    assert "extended by 60 s to 180 s" in await reasons(plane, session_id)


@pytest.mark.plane(session_check_interval_ms=100)
async def test_expiry_warns_then_destroys_the_container_and_charges_its_run_time(
    plane: JobPlane, agent: Agent, docker_client: docker.DockerClient, test_image: str
) -> None:
    session_id = await create(plane, test_image, 4)
    await wait_for(plane, session_id, S.JOB_STATE_RUNNING)
    await container_of(docker_client, session_id)
    ended = await wait_for(plane, session_id, S.JOB_STATE_TIMED_OUT, timeout=25)
    assert "session expired" in ended.state_reason
    assert ended.HasField("destroyed_at")
    assert ended.warning.startswith("expiry warning: expires at ")
    await gone(docker_client, f"gpuplane.job={session_id}")
    await charged_exactly_its_run_time(plane, ended)
    assert any(r.startswith("expiry warning: ") for r in await reasons(plane, session_id))


@pytest.mark.plane(host_resync_interval_ms=300)
async def test_the_periodic_resync_destroys_a_container_no_control_plane_knows(
    plane: JobPlane, agent: Agent, docker_client: docker.DockerClient, test_image: str
) -> None:
    assert agent.connect is not None
    await agent.connect.connected.wait()
    async with agent._reconciling:
        pass  # the reconcile of the hello's answer is over: only a later resync finds it
    labels = {
        "gpuplane.job": "job_00000000000000000000000000000000",
        "gpuplane.attempt": "1",
        "gpuplane.host": agent.host_id,
    }
    stray = docker_client.containers.run(
        test_image, ["sleep", "600"], detach=True, labels=labels, network_mode="none"
    )
    try:
        await gone(docker_client, f"gpuplane.job={labels['gpuplane.job']}", timeout=20)
    finally:
        if docker_client.containers.list(all=True, filters={"id": stray.id}, sparse=True):
            stray.remove(force=True)
    # The container leaves Docker's list before the daemon's removal call returns and counts
    # it: the count follows within a moment.
    await until(lambda: agent.orphans_removed >= 1, 10, "the daemon counted the orphan")


@pytest.mark.plane(heartbeat_timeout_ms=1000)
async def test_a_session_whose_daemon_dies_is_lost_and_not_charged(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    daemon = Agent(settings(plane, token, tmp_path / "d", s3_server, docker_engine, "1xA100-80GB"))
    await daemon.start()
    try:
        session_id = await create(plane, test_image, 120)
        await wait_for(plane, session_id, S.JOB_STATE_RUNNING)
    finally:
        await daemon.stop()  # as a crash: its container is left behind
    try:
        ended = await wait_for(plane, session_id, S.JOB_STATE_FAILED)
        assert "lost" in ended.state_reason
        assert not ended.HasField("destroyed_at"), "nothing confirmed its container gone"
        assert ended.charged_micro_credits == 0
        balance = await plane.balance(plane.consumer_tenant)
        assert (balance.held_micro_credits, balance.available_micro_credits) == (0, 100 * CREDIT)
    finally:
        for left in docker_client.containers.list(
            all=True, filters={"label": f"gpuplane.job={session_id}"}
        ):
            left.remove(force=True)


@pytest.mark.plane(heartbeat_timeout_ms=6000)  # the host stays online across the restart
async def test_a_restarted_daemon_adopts_a_session_with_its_extended_deadline(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    token = await plane.token()
    data_dir = tmp_path / "d"
    first = Agent(settings(plane, token, data_dir, s3_server, docker_engine, "1xA100-80GB"))
    await first.start()
    try:
        session_id = await create(plane, test_image, 4)
        await wait_for(plane, session_id, S.JOB_STATE_RUNNING)
        extend = sessions_pb2.ExtendSessionRequest(session_id=session_id, duration_seconds=3)
        await stub(plane).ExtendSession(extend, metadata=plane.auth(plane.consumer_key))
        async with asyncio.timeout(10):
            while first.deadlines[(session_id, 1)].seconds != 7:
                await asyncio.sleep(0.02)
    finally:
        await first.stop()  # its container runs on, its journal says 7 s
    second = Agent(settings(plane, token, data_dir, s3_server, docker_engine, "1xA100-80GB"))
    await second.start()
    try:
        ended = await wait_for(plane, session_id, S.JOB_STATE_TIMED_OUT, timeout=25)
        assert second.reattached == [(session_id, 1)]
    finally:
        await second.stop()
    assert ended.run_time_ms >= 6_500, "stopped at its first 4 s, not the extended 7"
    await gone(docker_client, f"gpuplane.job={session_id}")
    await charged_exactly_its_run_time(plane, ended)
