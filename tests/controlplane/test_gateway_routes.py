"""The gateway's routing table follows the control plane's change stream (a scripted daemon
plays the replica, on SQLite and PostgreSQL): a deployed service is routable at once (503: no
replica ready), a replica probed ready is routed to at once, one probed unready, ended or
scaled away is dropped at once, a stopped service is 503 and a deleted one 404 at once (in
milliseconds; BOUND allows a busy machine); no request reads the database; the
replica-state gauges say desired, running and ready per service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest
from gpuplane.v1 import messaging_pb2, registry_pb2, services_pb2, services_pb2_grpc, types_pb2

from controlplane.gateway.routes import Route
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2.JobReportKind
S = types_pb2
SV = services_pb2
PRICE = 2 * CREDIT
# How soon a change must reach the routing table: it takes milliseconds (20-40 ms); the room
# is for a busy 2-core machine (two CI runs once took 1.16 and 1.18 s, with 1 s here). The
# planes below resync only every minute, so only the change stream meets it.
BOUND = 3.0
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.databases("sqlite", "postgresql"),
    pytest.mark.plane(
        service_reconcile_interval_ms=100,
        gateway_address="127.0.0.1:0",
        gateway_resync_ms=60_000,  # what the tests see is the change stream, not a resync
    ),
]


class ProbingHost(ScriptedHost):
    """A scripted daemon that also reports its replicas' health probes."""

    async def probed(self, job_id: str, ready: bool, reason: str = "") -> None:
        health = registry_pb2.ReplicaHealth(job_id=job_id, attempt=1, ready=ready, reason=reason)
        await self._write(registry_pb2.DaemonMessage(replica_health=health))


def services_stub(plane: JobPlane) -> services_pb2_grpc.ServiceServiceAsyncStub:
    return services_pb2_grpc.ServiceServiceStub(plane.channel)


async def deploy(plane: JobPlane, name: str, key: str, replicas: int = 1) -> SV.Service:
    spec = S.JobSpec(image="busybox", gpu_count=1, max_price_per_gpu_hour_micro_credits=PRICE)
    request = SV.DeployServiceRequest(
        name=name, spec=spec, port=8080, replicas=replicas, health_path="/"
    )
    reply = await services_stub(plane).DeployService(request, metadata=plane.auth(key))
    return reply.service


async def gateway_base(plane: JobPlane) -> str:
    services = plane.plane.services
    assert services is not None
    async with asyncio.timeout(10):
        while services.gateway is None or not services.gateway.port:
            await asyncio.sleep(0.02)
    return f"http://127.0.0.1:{services.gateway.port}"


def route_of(plane: JobPlane, name: str) -> Route | None:
    services = plane.plane.services
    assert services is not None
    assert services.gateway is not None
    return services.gateway.routes.named(plane.consumer_tenant, name)


def routed(plane: JobPlane, name: str) -> tuple[str, ...] | None:
    """The replicas the service's route has (None: no route)."""
    route = route_of(plane, name)
    return None if route is None else route.replica_ids


def stopped(plane: JobPlane, name: str) -> bool:
    route = route_of(plane, name)
    return route is not None and not route.active


async def within(
    check: Callable[[], bool], bound: float = BOUND, what: str = "the routing table"
) -> float:
    """Seconds until `check()` holds, failing past `bound` (polled every 5 ms)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < bound, f"{what} did not follow within {bound} s"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def fetch(base: str, name: str, key: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/s/{name}/", headers=headers) as answer,
    ):
        return answer.status, await answer.text()


def gauge(plane: JobPlane, service_id: str, state: str) -> float | None:
    labels = {"service": service_id, "state": state}
    return plane.plane.metrics.registry.get_sample_value("gpuplane_service_replicas", labels)


async def test_routes_follow_readiness_ends_scaling_stop_and_delete_at_once(
    plane: JobPlane,
) -> None:
    base = await gateway_base(plane)
    host = await scripted_host(plane, ProbingHost, gpus=2, price=PRICE)
    try:
        service = await deploy(plane, "web", plane.consumer_key)
        await within(lambda: route_of(plane, "web") is not None)
        assert await fetch(base, "web", plane.consumer_key) == (
            503,
            "service unavailable: no replica is ready",
        )

        dispatch = await host.next_dispatch()
        await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(dispatch.job_id, [S.JOB_STATE_RUNNING])
        assert routed(plane, "web") == ()
        await host.probed(dispatch.job_id, ready=True)
        await within(lambda: routed(plane, "web") == (dispatch.job_id,))
        await within(lambda: gauge(plane, service.service_id, "ready") == 1, 10, "the gauge")
        assert gauge(plane, service.service_id, "desired") == 1
        assert gauge(plane, service.service_id, "running") == 1

        await host.probed(dispatch.job_id, ready=False, reason="HTTP 503")
        await within(lambda: routed(plane, "web") == ())
        status, text = await fetch(base, "web", plane.consumer_key)
        assert (status, text) == (503, "service unavailable: no replica is ready")

        await host.probed(dispatch.job_id, ready=True)
        await within(lambda: routed(plane, "web") == (dispatch.job_id,))
        await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=1, run_time_ms=2_000)
        await within(lambda: routed(plane, "web") == ())

        # Its replacement (after the backoff) ready, then scaled away: out of the routes as
        # soon as it is retired, before its daemon has stopped it.
        again = await host.next_dispatch()
        await host.report(again, K.JOB_REPORT_KIND_STARTING)
        await host.report(again, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(again.job_id, [S.JOB_STATE_RUNNING])
        await host.probed(again.job_id, ready=True)
        await within(lambda: routed(plane, "web") == (again.job_id,))
        scale = SV.ScaleServiceRequest(service="web", replicas=0)
        await services_stub(plane).ScaleService(scale, metadata=plane.auth(plane.consumer_key))
        await within(lambda: routed(plane, "web") == ())
        assert (await plane.get(again.job_id)).state == S.JOB_STATE_RUNNING, "still running"

        stop = SV.StopServiceRequest(service="web")
        await services_stub(plane).StopService(stop, metadata=plane.auth(plane.consumer_key))
        await within(lambda: stopped(plane, "web"))
        assert await fetch(base, "web", plane.consumer_key) == (
            503,
            "service unavailable: 'web' is stopped",
        )
        delete = SV.DeleteServiceRequest(service="web")
        await services_stub(plane).DeleteService(delete, metadata=plane.auth(plane.consumer_key))
        await within(lambda: route_of(plane, "web") is None)
        assert await fetch(base, "web", plane.consumer_key) == (404, "no service 'web'")
        await within(lambda: gauge(plane, service.service_id, "desired") is None, 10, "gauge")
    finally:
        await host.close()


async def test_a_restarted_watcher_loads_every_route_again(plane: JobPlane) -> None:
    """A gap in the stream (here: changes made while nobody listened) is healed by the
    full load that follows it."""
    await gateway_base(plane)
    services = plane.plane.services
    assert services is not None
    assert services.route_watcher is not None
    watcher = services.route_watcher
    feed_listeners = services.listeners
    saved = list(feed_listeners)
    feed_listeners.clear()  # the change below is not told to anyone
    try:
        await deploy(plane, "quiet", plane.consumer_key, replicas=0)
    finally:
        feed_listeners.extend(saved)
    await asyncio.sleep(0.2)
    assert route_of(plane, "quiet") is None, "nobody told the table"
    watcher.resync()
    await within(lambda: route_of(plane, "quiet") is not None)


async def test_requests_are_answered_from_memory_with_the_database_unreachable(
    plane: JobPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No database read per request: with every read and transaction failing, the gateway
    still authenticates (a cached API key, a caller key) and routes."""
    base = await gateway_base(plane)
    await deploy(plane, "web", plane.consumer_key, replicas=0)
    made = await services_stub(plane).CreateServiceKey(
        SV.CreateServiceKeyRequest(service="web"), metadata=plane.auth(plane.consumer_key)
    )
    await within(lambda: bool(getattr(route_of(plane, "web"), "keys", None)))
    assert (await fetch(base, "web", plane.consumer_key))[0] == 503  # the API key now cached
    db = plane.plane.db
    assert db is not None

    def unreachable(*args: object, **kwargs: object) -> None:
        raise AssertionError("the gateway read the database for a request")

    with monkeypatch.context() as patched:
        for method in ("read", "transaction", "run"):
            patched.setattr(db, method, unreachable)
        for key in (plane.consumer_key, made.secret) * 20:
            assert await fetch(base, "web", key) == (
                503,
                "service unavailable: no replica is ready",
            )
        assert (await fetch(base, "nope", plane.consumer_key))[0] == 404
