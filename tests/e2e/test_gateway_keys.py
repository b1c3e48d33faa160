"""The gateway on two real daemons with busybox httpd replicas: a service's caller key is
answered by its replicas (and by nothing else), stops at once when revoked; a replica whose
health probe starts failing stops getting traffic as soon as its daemon says so."""

from __future__ import annotations

import asyncio

import docker
import pytest
from gpuplane.v1 import services_pb2, types_pb2

from daemon.agent import Agent
from devstack.factories import new_tenant
from tests.controlplane.test_gateway_routes import within
from tests.e2e.test_gateway import fetch, gateway_url
from tests.e2e.test_services import SERVE, agents, deploy, ready, stub, until
from tests.harness import JobPlane

__all__ = ["agents"]  # the fixture, from test_services
SV = services_pb2
pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.docker,
    pytest.mark.plane(
        service_reconcile_interval_ms=100,
        gateway_address="127.0.0.1:0",
        gateway_resync_ms=60_000,
    ),
]


async def test_caller_keys_and_an_unready_replica_at_the_gateway(
    plane: JobPlane, agents: list[Agent], docker_client: docker.DockerClient, test_image: str
) -> None:
    base = await gateway_url(plane)
    await deploy(plane, test_image, 2, SERVE)
    up = await until(plane, ready(2))
    replicas = {r.replica_id for r in up.replicas if r.state == types_pb2.JOB_STATE_RUNNING}
    auth = plane.auth(plane.consumer_key)
    made = await stub(plane).CreateServiceKey(
        SV.CreateServiceKeyRequest(service="web", description="e2e"), metadata=auth
    )
    services = plane.plane.services
    assert services is not None
    assert services.gateway is not None
    routes = services.gateway.routes

    def keyed() -> bool:
        route = routes.named(plane.consumer_tenant, "web")
        return route is not None and bool(route.keys)

    await within(keyed)
    answered = set()
    for _ in range(4):
        status, headers, body = await asyncio.to_thread(fetch, f"{base}/s/web/", made.secret)
        assert status == 200, body
        answered.add(headers["X-Gpuplane-Replica"])
    assert answered == replicas, "the caller key is served round-robin like the owner"
    _, other = await new_tenant(plane, "other", types_pb2.ROLE_CONSUMER)
    status, _, _ = await asyncio.to_thread(fetch, f"{base}/s/web/", other)
    assert status == 404

    # Its page gone, a replica fails its probe ("/" answers 404): within its daemon's next
    # probe (every second) and the change stream, it is out of the routes.
    sick, well = sorted(replicas)
    container = docker_client.containers.list(filters={"label": f"gpuplane.job={sick}"})[0]
    await asyncio.to_thread(container.exec_run, ["rm", "/tmp/www/index.html"])

    def only_well() -> bool:
        route = routes.named(plane.consumer_tenant, "web")
        return route is not None and route.replica_ids == (well,)

    await within(only_well, 5, "the unready replica's route")
    for _ in range(4):
        status, headers, body = await asyncio.to_thread(fetch, f"{base}/s/web/", made.secret)
        assert status == 200, body
        # Not the sick one (its liveness failing soon, a replacement may join `well`).
        assert headers["X-Gpuplane-Replica"] != sick

    revoke = SV.RevokeServiceKeyRequest(service="web", key_id=made.key.key_id)
    await stub(plane).RevokeServiceKey(revoke, metadata=auth)
    await within(lambda: not keyed())
    status, _, _ = await asyncio.to_thread(fetch, f"{base}/s/web/", made.secret)
    assert status == 401
