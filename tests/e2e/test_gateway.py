"""The services gateway (embedded in the control plane) on two real daemons: requests to
/s/web/ are answered by the replicas round-robin through their daemons' tunnels, each page
naming its container; another tenant's caller gets 404 and no key 401; with no replica ready
the answer is 503 with the reason."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import docker
import pytest
from gpuplane.v1 import types_pb2

from controlplane.gateway.breaker import Circuit
from daemon.agent import Agent
from devstack.factories import new_tenant
from tests.e2e.test_services import SERVE, agents, cleanup, deploy, ready, scale, until
from tests.harness import JobPlane

__all__ = ["agents", "cleanup"]  # the fixtures, from test_services
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.docker,
    pytest.mark.plane(
        service_backoff_base_ms=200,
        service_reconcile_interval_ms=100,
        gateway_address="127.0.0.1:0",
    ),
]


def fetch(url: str, key: str | None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def gateway_url(plane: JobPlane) -> str:
    services = plane.plane.services
    assert services is not None
    deadline = time.monotonic() + 10
    while services.gateway is None or not services.gateway.port:
        assert time.monotonic() < deadline, "the gateway did not start"
        await asyncio.sleep(0.05)
    return f"http://127.0.0.1:{services.gateway.port}"


async def test_requests_reach_ready_replicas_round_robin_through_the_gateway(
    plane: JobPlane, agents: list[Agent], docker_client: docker.DockerClient, test_image: str
) -> None:
    base = await gateway_url(plane)
    await deploy(plane, test_image, 3, SERVE)
    up = await until(plane, ready(3))
    replicas = {r.replica_id for r in up.replicas if r.state == types_pb2.JOB_STATE_RUNNING}
    seen: dict[str, bytes] = {}
    for _ in range(3):
        status, headers, body = await asyncio.to_thread(fetch, f"{base}/s/web/", plane.consumer_key)
        assert status == 200, body
        seen[headers["X-Gpuplane-Replica"]] = body
    assert set(seen) == replicas, "round-robin: each replica once"
    assert len(set(seen.values())) == 3, "each page names its own container"
    registry = plane.plane.metrics.registry
    for replica in replicas:
        labels = {"service": up.service_id, "replica": replica, "code": "200"}
        assert registry.get_sample_value("gpuplane_gateway_requests_total", labels) == 1
    timed = {"service": up.service_id}
    assert registry.get_sample_value("gpuplane_gateway_request_seconds_count", timed) == 3

    # A replica's container killed: GETs keep being answered (one that hits the dead replica
    # is retried on another), and the service heals.
    victim = sorted(replicas)[0]
    docker_client.containers.list(filters={"label": f"gpuplane.job={victim}"})[0].kill()
    for _ in range(6):
        status, headers, body = await asyncio.to_thread(fetch, f"{base}/s/web/", plane.consumer_key)
        assert status == 200, body
        assert headers["X-Gpuplane-Replica"] != victim
    await until(plane, lambda s: ready(3)(s) and s.restarts == 1)

    status, _, body = await asyncio.to_thread(fetch, f"{base}/s/web/", None)
    assert status == 401, body
    _, other = await new_tenant(plane, "other", types_pb2.ROLE_CONSUMER)
    status, _, body = await asyncio.to_thread(fetch, f"{base}/s/web/", other)
    assert status == 404, body

    await scale(plane, 0)
    await until(plane, ready(0))
    status, _, body = await asyncio.to_thread(fetch, f"{base}/s/web/", plane.consumer_key)
    assert status == 503, body
    assert b"no replica is ready" in body


@pytest.mark.plane(
    service_reconcile_interval_ms=100,
    gateway_address="127.0.0.1:0",
    heartbeat_timeout_ms=20_000,
    tunnel_open_timeout_ms=300,
)
async def test_a_replica_that_stops_answering_opens_its_circuit(
    plane: JobPlane, agents: list[Agent], cleanup: None, test_image: str
) -> None:
    base = await gateway_url(plane)
    await deploy(plane, test_image, 2, SERVE)
    up = await until(plane, ready(2))
    crashed = agents[0]
    dead = next(r.replica_id for r in up.replicas if r.host_id == crashed.host_id)
    await crashed.stop()  # its replica stays RUNNING and ready until the heartbeat timeout
    services = plane.plane.services
    assert services is not None
    assert services.gateway is not None
    for _ in range(6):  # the dead replica's turns fail (and are retried on the other)
        status, headers, body = await asyncio.to_thread(fetch, f"{base}/s/web/", plane.consumer_key)
        assert status == 200, body
        assert headers["X-Gpuplane-Replica"] != dead
    breaker = services.gateway.pools[up.service_id].replicas[dead].breaker
    assert breaker.circuit is Circuit.OPEN, "3 failures in a row"
    for _ in range(3):  # the open circuit is skipped: the dead replica is not tried again
        status, headers, _ = await asyncio.to_thread(fetch, f"{base}/s/web/", plane.consumer_key)
        assert status == 200
        assert headers["X-Gpuplane-Replica"] != dead
    # Still 3: none of the last requests went to the dead replica (a try would count one
    # more failure after its 0.3 s open timeout; a wall-clock bound failed on a loaded machine).
    failures = plane.plane.metrics.registry.get_sample_value(
        "gpuplane_gateway_replica_failures_total", {"service": up.service_id, "replica": dead}
    )
    assert failures == 3
