"""Services on real servers and two real daemons with Docker and the busybox image serving a
page (`httpd`, probed inside each container's network namespace), the daemons' restarts in
place turned off (tests/e2e/test_replica_restarts.py has them): 3 replicas spread over
both hosts and ready; a killed container is replaced and the service is 3 ready again; each
replica is charged exactly its run time; a crashed daemon's replicas are replaced on the
other host within the heartbeat timeout + 10 s; stop, start, scale to 0 and back, delete; a
replica that crashes on start is replaced with a growing backoff and the service says why."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import docker
import pytest
from gpuplane.v1 import jobs_pb2, services_pb2, services_pb2_grpc, types_pb2

from controlplane.ledger.transfers import charge_for
from daemon.agent import Agent
from devstack import DockerEngine, S3Server
from devstack.factories import new_tenant
from tests.e2e.test_job_path import PRICE, settings
from tests.harness import CREDIT, JobPlane

S = types_pb2
SV = services_pb2
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.docker,
    pytest.mark.plane(service_backoff_base_ms=200, service_reconcile_interval_ms=100),
]
# Each replica writes a page naming its container, then serves it on 8080.
SERVE = [
    "sh",
    "-c",
    "mkdir -p /tmp/www && hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
]


@contextlib.asynccontextmanager
async def two_agents(
    plane: JobPlane, tmp_path: Path, s3: S3Server, engine: DockerEngine, **overrides: object
) -> AsyncIterator[list[Agent]]:
    """Two daemons of 3 GPUs each, their settings changed by `overrides`."""
    running = []
    try:
        for name in ("a", "b"):
            token = await plane.token()
            made = settings(plane, token, tmp_path / name, s3, engine, "3xA100-80GB")
            agent = Agent(made.model_copy(update=overrides))
            await agent.start()
            running.append(agent)
        yield running
    finally:
        for agent in running:
            await agent.stop()


@pytest.fixture
async def agents(
    plane: JobPlane, tmp_path: Path, s3_server: S3Server, docker_engine: DockerEngine
) -> AsyncIterator[list[Agent]]:
    """Two daemons that restart no replica in place: a failing one's attempt ends at once."""
    async with two_agents(
        plane, tmp_path, s3_server, docker_engine, replica_restart_max=0
    ) as running:
        yield running


@pytest.fixture
def cleanup(docker_client: docker.DockerClient) -> Iterator[None]:
    """Removes the containers a crashed daemon left behind."""
    yield
    for left in docker_client.containers.list(all=True, filters={"label": "gpuplane.job"}):
        if left.labels.get("gpuplane.job", "").startswith("rep_"):
            left.remove(force=True)


def stub(plane: JobPlane) -> services_pb2_grpc.ServiceServiceAsyncStub:
    return services_pb2_grpc.ServiceServiceStub(plane.channel)


async def deploy(plane: JobPlane, image: str, replicas: int, command: list[str]) -> SV.Service:
    spec = S.JobSpec(
        image=image, args=command, gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE
    )
    request = SV.DeployServiceRequest(
        name="web", spec=spec, port=8080, replicas=replicas, health_path="/"
    )
    reply = await stub(plane).DeployService(request, metadata=plane.auth(plane.consumer_key))
    return reply.service


async def get(plane: JobPlane) -> SV.Service:
    request = SV.GetServiceRequest(service="web")
    reply = await stub(plane).GetService(request, metadata=plane.auth(plane.consumer_key))
    return reply.service


async def until(
    plane: JobPlane, check: Callable[[SV.Service], bool], timeout: float = 20
) -> SV.Service:
    deadline = time.monotonic() + timeout
    while not check(current := await get(plane)):
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.05)
    return current


def ready(n: int) -> Callable[[SV.Service], bool]:
    return lambda s: s.ready_replicas == n and s.running_replicas == n


def live(service: SV.Service) -> list[SV.ServiceReplica]:
    on = (S.JOB_STATE_QUEUED, S.JOB_STATE_SCHEDULED, S.JOB_STATE_RUNNING)
    return [r for r in service.replicas if r.state in on]


async def scale(plane: JobPlane, replicas: int) -> None:
    request = SV.ScaleServiceRequest(service="web", replicas=replicas)
    await stub(plane).ScaleService(request, metadata=plane.auth(plane.consumer_key))


async def test_replicas_spread_heal_and_are_charged_their_run_time(
    plane: JobPlane, agents: list[Agent], docker_client: docker.DockerClient, test_image: str
) -> None:
    await deploy(plane, test_image, 3, SERVE)
    up = await until(plane, ready(3))
    hosts = {r.host_id for r in live(up)}
    assert hosts == {a.host_id for a in agents}, "spread over both hosts"
    assert up.restarts == 0

    # A replica's container killed: it ends, is replaced, and the service is 3 ready again.
    victim = live(up)[0].replica_id
    container = docker_client.containers.list(filters={"label": f"gpuplane.job={victim}"})[0]
    container.kill()
    healed = await until(
        plane, lambda s: ready(3)(s) and victim not in {r.replica_id for r in live(s)}
    )
    assert healed.restarts == 1
    assert victim in healed.last_failure
    assert {r.host_id for r in live(healed)} == hosts

    # Scaled to 0: each replica is charged exactly the run time its daemon reported.
    await scale(plane, 0)
    down = await until(plane, lambda s: not live(s))
    assert len(down.replicas) == 4
    total = 0
    for replica in down.replicas:
        assert replica.run_time_ms > 0
        assert replica.charged_micro_credits == charge_for(PRICE, 1, replica.run_time_ms)
        total += replica.charged_micro_credits
    assert down.charged_micro_credits == total
    balance = await plane.balance(plane.consumer_tenant)
    assert balance.held_micro_credits == 0
    assert balance.available_micro_credits == 100 * CREDIT - total
    await plane.assert_ledger_consistent()

    # And back: 2 replicas, one on each host.
    await scale(plane, 2)
    again = await until(plane, ready(2))
    assert {r.host_id for r in live(again)} == hosts


@pytest.mark.plane(heartbeat_timeout_ms=1000)
async def test_a_lost_hosts_replicas_are_replaced_then_stop_start_delete(
    plane: JobPlane, agents: list[Agent], cleanup: None, test_image: str
) -> None:
    await deploy(plane, test_image, 2, SERVE)
    up = await until(plane, ready(2))
    crashed, survivor = agents
    lost = {r.replica_id for r in live(up) if r.host_id == crashed.host_id}
    assert len(lost) == 1
    await crashed.stop()  # as a crash: its containers are left behind
    started = time.monotonic()
    moved = await until(
        plane,
        lambda s: ready(2)(s) and not lost & {r.replica_id for r in live(s)},
        timeout=1 + 10,
    )
    assert time.monotonic() - started < 1 + 10
    assert {r.host_id for r in live(moved)} == {survivor.host_id}
    assert moved.restarts == 1

    auth = plane.auth(plane.consumer_key)
    stopped = await stub(plane).StopService(SV.StopServiceRequest(service="web"), metadata=auth)
    assert stopped.service.state == SV.SERVICE_STATE_STOPPED
    await until(plane, lambda s: not live(s))
    await stub(plane).StartService(SV.StartServiceRequest(service="web"), metadata=auth)
    await until(plane, ready(2))
    await stub(plane).DeleteService(SV.DeleteServiceRequest(service="web"), metadata=auth)
    request = SV.ListServicesRequest(include_deleted=True)
    deleted = (await stub(plane).ListServices(request, metadata=auth)).services[0]
    deadline = time.monotonic() + 15
    while live(deleted):
        assert time.monotonic() < deadline, deleted
        await asyncio.sleep(0.05)
        deleted = (await stub(plane).ListServices(request, metadata=auth)).services[0]
    assert deleted.state == SV.SERVICE_STATE_DELETED
    assert (await plane.balance(plane.consumer_tenant)).held_micro_credits == 0


async def test_a_replica_crashing_on_start_is_replaced_with_backoff(
    plane: JobPlane, agents: list[Agent], test_image: str
) -> None:
    await deploy(plane, test_image, 1, ["sh", "-c", "exit 3"])
    failing = await until(plane, lambda s: s.restarts >= 3)
    assert "exit code 3" in failing.last_failure, failing.last_failure
    assert failing.HasField("backoff_until")
    # Not a tight loop: each replacement waits twice as long as the one before.
    created = sorted(r.created_at.ToNanoseconds() / 1e9 for r in failing.replicas)
    gaps = [b - a for a, b in zip(created, created[1:], strict=False)]
    assert gaps[-1] >= 0.4, gaps
    await asyncio.sleep(1.0)
    later = await get(plane)
    assert later.restarts <= failing.restarts + 2, "backing off, not looping"


@pytest.mark.plane(service_lease_seconds=2, service_lease_renew_lead_seconds=1)
async def test_leases_are_extended_while_the_credit_lasts_then_the_service_stops(
    plane: JobPlane, agents: list[Agent], test_image: str
) -> None:
    # 2,500 micro-credits pay for a first lease (2 s: 1,112) and one extension (to 4 s:
    # 2,223 held), not a second (3,334).
    _, key = await new_tenant(plane, "thrifty", S.ROLE_CONSUMER, micro_credits=2_500)
    auth = plane.auth(key)
    spec = S.JobSpec(
        image=test_image, args=SERVE, gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE
    )
    request = SV.DeployServiceRequest(name="web", spec=spec, port=8080, replicas=1)
    await stub(plane).DeployService(request, metadata=auth)

    async def current() -> SV.Service:
        got = stub(plane).GetService(SV.GetServiceRequest(service="web"), metadata=auth)
        return (await got).service

    deadline = time.monotonic() + 20
    while (service := await current()).state != SV.SERVICE_STATE_STOPPED:
        assert time.monotonic() < deadline, service
        await asyncio.sleep(0.1)
    assert service.state_reason.startswith("credit exhausted"), service.state_reason
    reasons = [e.reason for e in service.events]
    assert any(r.startswith("credit warning: insufficient credit") for r in reasons), reasons
    replica = service.replicas[0]
    got = plane.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=replica.replica_id), metadata=auth)
    job = (await got).job
    assert job.state == S.JOB_STATE_TIMED_OUT
    assert job.spec.max_duration_seconds == 4, "extended once, from 2 s to 4 s"
    assert replica.run_time_ms >= 4000
    assert replica.charged_micro_credits == charge_for(PRICE, 1, 4000)
    assert len(service.replicas) == 1, "not replaced: the service stopped"
    await plane.assert_ledger_consistent()


async def test_a_replica_failing_liveness_is_stopped_by_its_daemon_and_replaced(
    plane: JobPlane, agents: list[Agent], test_image: str
) -> None:
    # Serves for 2 s, then stops answering while its container keeps running.
    script = (
        "mkdir -p /tmp/www && hostname > /tmp/www/index.html && "
        "httpd -f -p 8080 -h /tmp/www & sleep 2; kill $!; exec sleep 1000"
    )
    await deploy(plane, test_image, 1, ["sh", "-c", script])
    first = (await until(plane, ready(1))).replicas[0]
    failed = await until(plane, lambda s: s.restarts >= 1)
    ended = next(r for r in failed.replicas if r.replica_id == first.replica_id)
    assert ended.state == S.JOB_STATE_FAILED
    assert ended.state_reason.startswith("failed its health probe 3 times in a row: "), ended
    assert first.replica_id in failed.last_failure
    reasons = [e.reason for e in failed.events]
    assert f"replica {first.replica_id} ready" in reasons, reasons
    assert any(r.startswith(f"replica {first.replica_id} not ready: ") for r in reasons), reasons
