"""Replicas restarted in place by their daemons, on real servers, two real daemons, Docker and
busybox httpd: a killed replica's container is started again (same replica, attempt and
host; traffic through the gateway keeps flowing; its restart is a service event and counted;
its charge is its whole run time); a replica that keeps dying is restarted with growing gaps
and then replaced on the other host; one failing liveness is restarted, then replaced; a
stop during a restart's backoff ends it at once; a daemon restarted during a backoff adopts
the same container, restarts it and counts on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import grpc
import pytest
from gpuplane.v1 import jobs_pb2, services_pb2, tunnels_pb2, tunnels_pb2_grpc, types_pb2

from controlplane.ledger.transfers import charge_for
from daemon.agent import Agent
from devstack import DockerEngine, S3Server
from tests.e2e.test_gateway import fetch, gateway_url
from tests.e2e.test_job_path import PRICE
from tests.e2e.test_services import SERVE, deploy, get, live, ready, scale, stub, two_agents, until
from tests.e2e.tunnelstack import aiter_of
from tests.harness import JobPlane

S = types_pb2
SV = services_pb2
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.docker,
    pytest.mark.plane(service_backoff_base_ms=200, service_reconcile_interval_ms=100),
]


@pytest.fixture
async def restarting(
    plane: JobPlane,
    tmp_path: Path,
    s3_server: S3Server,
    docker_engine: DockerEngine,
    request: pytest.FixtureRequest,
) -> AsyncIterator[list[Agent]]:
    """Two daemons restarting replicas in place: twice within their window, the first after
    0.3 s, unless the test's `param` (settings) says otherwise."""
    overrides = {
        "replica_restart_backoff_seconds": 0.3,
        "replica_restart_max": 2,
        **getattr(request, "param", {}),
    }
    async with two_agents(plane, tmp_path, s3_server, docker_engine, **overrides) as running:
        yield running


def events_of(service: SV.Service, replica_id: str) -> list[SV.ServiceEvent]:
    """The replica's events, oldest first."""
    return [e for e in reversed(service.events) if e.reason.startswith(f"replica {replica_id} ")]


def replica_of(service: SV.Service, replica_id: str) -> SV.ServiceReplica:
    return next(r for r in service.replicas if r.replica_id == replica_id)


@pytest.mark.plane(
    service_backoff_base_ms=200, service_reconcile_interval_ms=100, gateway_address="127.0.0.1:0"
)
async def test_a_killed_replica_is_restarted_in_place_while_traffic_flows(
    plane: JobPlane,
    restarting: list[Agent],
    docker_client: docker.DockerClient,
    test_image: str,
) -> None:
    base = await gateway_url(plane)
    await deploy(plane, test_image, 2, SERVE)
    up = await until(plane, ready(2))
    victim = live(up)[0]
    [container] = docker_client.containers.list(
        filters={"label": f"gpuplane.job={victim.replica_id}"}
    )
    killed = time.monotonic()
    await asyncio.to_thread(container.kill)
    # Requests keep being answered: one that meets the dead replica is retried on the other.
    for _ in range(6):
        status, _, body = await asyncio.to_thread(fetch, f"{base}/s/web/", plane.consumer_key)
        assert status == 200, body

    healed = await until(
        plane, lambda s: ready(2)(s) and replica_of(s, victim.replica_id).restarts == 1
    )
    assert time.monotonic() - killed < 5, "ready again within a few seconds"
    again = replica_of(healed, victim.replica_id)
    assert {r.replica_id for r in live(healed)} == {r.replica_id for r in live(up)}, "not replaced"
    assert (again.state, again.host_id) == (S.JOB_STATE_RUNNING, victim.host_id)
    assert again.started_at == victim.started_at, "the same attempt, running throughout"
    assert healed.restarts == 0, "no replacement"
    got = await plane.jobs.GetJob(
        jobs_pb2.GetJobRequest(job_id=victim.replica_id), metadata=plane.auth(plane.consumer_key)
    )
    assert (got.job.attempt, len(got.job.attempts)) == (1, 1)
    assert [
        c.id
        for c in docker_client.containers.list(
            filters={"label": f"gpuplane.job={victim.replica_id}"}
        )
    ] == [container.id], "the same container, started again"
    said = [e.reason for e in events_of(healed, victim.replica_id)]
    restarted = f"replica {victim.replica_id} restarted in place (1): exited with code 137; "
    assert any(r.startswith(restarted + "restart 1 in 0.3 s") for r in said), said
    last_restart = max(i for i, r in enumerate(said) if r.startswith(restarted))
    assert f"replica {victim.replica_id} ready" in said[last_restart:], said

    # Its charge is its whole run time, the restart included, at its host's price.
    await scale(plane, 0)
    down = await until(plane, lambda s: not live(s))
    ended = replica_of(down, victim.replica_id)
    assert ended.charged_micro_credits == charge_for(PRICE, 1, ended.run_time_ms)
    ran_ms = ended.finished_at.ToMilliseconds() - ended.started_at.ToMilliseconds()
    assert abs(ended.run_time_ms - ran_ms) < 1500, (ended.run_time_ms, ran_ms)
    assert (await plane.balance(plane.consumer_tenant)).held_micro_credits == 0
    await plane.assert_ledger_consistent()


async def test_a_replica_that_keeps_dying_is_restarted_with_growing_gaps_then_replaced(
    plane: JobPlane, restarting: list[Agent], test_image: str
) -> None:
    await deploy(plane, test_image, 1, ["sh", "-c", "sleep 0.2; exit 3"])
    replaced = await until(
        plane, lambda s: s.restarts >= 1 and len(s.replicas) >= 2 and bool(s.replicas[-2].host_id)
    )
    first = replaced.replicas[-1]  # newest first
    assert (first.state, first.restarts) == (S.JOB_STATE_FAILED, 2)
    assert first.state_reason == "exit code 3", first.state_reason
    assert first.replica_id in replaced.last_failure
    said = events_of(replaced, first.replica_id)
    restarts = [e for e in said if " restarted in place " in e.reason]
    said_first = f"replica {first.replica_id} restarted in place"
    assert [e.reason for e in restarts] == [
        f"{said_first} (1): exited with code 3; restart 1 in 0.3 s",
        f"{said_first} (2): exited with code 3; restart 2 in 0.6 s",
    ]
    times = [e.time.ToMilliseconds() / 1000 for e in restarts]
    times.append(first.finished_at.ToMilliseconds() / 1000)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.3 + 0.2, gaps
    assert gaps[1] >= 0.6 + 0.2, gaps
    assert gaps[1] > gaps[0], "growing"
    second = replaced.replicas[-2]
    assert second.host_id not in ("", first.host_id), "replaced on the other host"


@pytest.mark.parametrize("restarting", [{"replica_restart_backoff_seconds": 30.0}], indirect=True)
async def test_a_stop_during_the_backoff_ends_the_replica_at_once(
    plane: JobPlane, restarting: list[Agent], docker_client: docker.DockerClient, test_image: str
) -> None:
    await deploy(plane, test_image, 1, ["sh", "-c", "sleep 0.3; exit 1"])
    backing_off = await until(plane, lambda s: any(r.restarts == 1 for r in s.replicas))
    replica = backing_off.replicas[0]
    assert replica.state == S.JOB_STATE_RUNNING, "running (and billed) through its backoff"
    auth = plane.auth(plane.consumer_key)
    # A tunnel into it meanwhile is refused plainly: its container has no process to enter.
    opening = [
        tunnels_pb2.PortForwardRequest(
            start=tunnels_pb2.PortForwardStart(job_id=replica.replica_id, port=8080)
        ),
        tunnels_pb2.PortForwardRequest(close_write=True),
    ]
    call = tunnels_pb2_grpc.TunnelServiceStub(plane.channel).PortForward(
        aiter_of(opening),  # type: ignore[arg-type]
        metadata=auth,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _ = [answer async for answer in call]
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not running now" in (caught.value.details() or "")
    asked = time.monotonic()
    await stub(plane).StopService(SV.StopServiceRequest(service="web"), metadata=auth)
    stopped = await until(plane, lambda s: not live(s), timeout=10)
    assert time.monotonic() - asked < 5, "not after the 30 s backoff"
    ended = stopped.replicas[0]
    assert ended.state == S.JOB_STATE_CANCELLED
    assert ended.restarts == 1, "no restart after the stop"
    assert ended.charged_micro_credits == charge_for(PRICE, 1, ended.run_time_ms)
    assert ended.run_time_ms >= 300
    left = docker_client.containers.list(
        all=True, filters={"label": f"gpuplane.job={replica.replica_id}"}
    )
    assert left == []
    assert (await get(plane)).state == SV.SERVICE_STATE_STOPPED
    assert (await plane.balance(plane.consumer_tenant)).held_micro_credits == 0


@pytest.mark.parametrize("restarting", [{"replica_restart_max": 1}], indirect=True)
async def test_a_replica_failing_liveness_is_restarted_in_place_then_replaced(
    plane: JobPlane, restarting: list[Agent], test_image: str
) -> None:
    # Serves for 1 s after each start, then stops answering while its container keeps running.
    script = (
        "mkdir -p /tmp/www && hostname > /tmp/www/index.html && "
        "httpd -f -p 8080 -h /tmp/www & sleep 1; kill $!; exec sleep 1000"
    )
    await deploy(plane, test_image, 1, ["sh", "-c", script])
    first = (await until(plane, ready(1))).replicas[0]
    failed = await until(plane, lambda s: s.restarts >= 1, timeout=30)
    ended = replica_of(failed, first.replica_id)
    assert (ended.state, ended.restarts) == (S.JOB_STATE_FAILED, 1)
    assert ended.state_reason.startswith("failed its health probe 3 times in a row: "), ended
    said = [e.reason for e in events_of(failed, first.replica_id)]
    restarted = f"replica {first.replica_id} restarted in place (1): failed its health probe 3 "
    at = next(i for i, r in enumerate(said) if r.startswith(restarted))
    assert said[at].endswith("; restart 1 in 0.3 s"), said[at]
    assert f"replica {first.replica_id} ready" in said[:at], said
    assert f"replica {first.replica_id} ready" in said[at:], "ready again after its restart"


@pytest.mark.parametrize("restarting", [{"replica_restart_backoff_seconds": 2.0}], indirect=True)
async def test_a_daemon_restarted_during_a_backoff_restarts_the_same_container(
    plane: JobPlane, restarting: list[Agent], docker_client: docker.DockerClient, test_image: str
) -> None:
    # Fails its first run (its /output, kept across restarts, remembers it), then serves.
    script = (
        "[ -e /output/ran ] || { touch /output/ran; exit 1; }; mkdir -p /tmp/www && "
        "hostname > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"
    )
    await deploy(plane, test_image, 1, ["sh", "-c", script])
    backing_off = await until(plane, lambda s: any(r.restarts == 1 for r in s.replicas))
    replica = backing_off.replicas[0]
    label = {"label": f"gpuplane.job={replica.replica_id}"}
    [container] = docker_client.containers.list(all=True, filters=label)
    old = next(a for a in restarting if a.host_id == replica.host_id)
    await old.stop()  # during the backoff: the exited container is left as it is
    anew = Agent(old.settings)
    await anew.start()
    try:
        healed = await until(plane, ready(1))
        again = replica_of(healed, replica.replica_id)
        assert (again.host_id, again.started_at) == (replica.host_id, replica.started_at)
        assert again.restarts == 2, "adopted, restarted, counted on"
        assert [c.id for c in docker_client.containers.list(all=True, filters=label)] == [
            container.id
        ], "the same container, and no second one"
        assert healed.restarts == 0, "not replaced"
    finally:
        await anew.stop()
        for left in docker_client.containers.list(all=True, filters=label):
            left.remove(force=True)
