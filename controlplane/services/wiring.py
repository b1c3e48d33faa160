"""How the control plane process wires services in: their servicer and the reconciler loop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from gpuplane.v1 import services_pb2, services_pb2_grpc
from grpc import aio

from controlplane.api.services import ServiceServicer
from controlplane.auth.service import AuthService
from controlplane.gateway.proxy import Gateway
from controlplane.gateway.routes import RouteTable
from controlplane.gateway.watch import API_KEY_PREFIX, RouteFeed, RouteWatcher
from controlplane.jobs.service import JobService
from controlplane.registry.service import RegistryService
from controlplane.services.reconciler import Reconciler
from controlplane.services.service import ServiceService
from controlplane.services.settings import ServiceSettings

if TYPE_CHECKING:
    from controlplane.server import ControlPlane

SERVICE_NAME = services_pb2.DESCRIPTOR.services_by_name["ServiceService"].full_name


def build_services(
    jobs: JobService, registry: RegistryService, settings: ServiceSettings
) -> ServiceService:
    """The services domain; daemons' ReplicaHealth messages reach it through the registry."""
    services = ServiceService(jobs, settings)
    registry.on_replica_health = services.replica_health
    return services


def add_servicer(server: aio.Server, services: ServiceService | None) -> None:
    assert services is not None
    services_pb2_grpc.add_ServiceServiceServicer_to_server(ServiceServicer(services), server)


def services_loop(plane: ControlPlane, auth: AuthService) -> Callable[[], Awaitable[None]] | None:
    """The services' reconciler loop (it acts only while the process leads), the route
    changes told to the other replicas and, when `gateway_address` is set, the gateway beside
    them (on every replica) with its routing table kept from those changes."""
    services, leader, tunnels, bus = plane.services, plane.leader, plane.tunnels, plane.bus
    if services is None or leader is None:
        return None
    reconciler = Reconciler(services, leader)
    feed = RouteFeed()
    services.listeners.append(feed.changed)
    services.jobs.notifier.listeners.append(feed.changed)
    # A key revoked on another replica leaves this one's cache at once, not after its ttl.
    auth.revoked_listeners.append(feed.changed)
    feed.subscribers.append(
        lambda ref: auth.forget(ref) if ref.startswith(API_KEY_PREFIX) else None
    )

    address = services.settings.gateway_address
    if not address or tunnels is None:

        async def run_without_gateway() -> None:
            await asyncio.gather(reconciler.run(), feed.follow(bus))

        return run_without_gateway
    table = RouteTable()
    watcher = RouteWatcher(services.jobs.db, table, feed, services.settings.gateway_resync_seconds)
    gateway = Gateway(services, tunnels, auth, plane.metrics.registry, routes=table)
    services.gateway = gateway
    services.route_watcher = watcher

    async def serve() -> None:
        await watcher.loaded.wait()  # no answer from an empty table
        await gateway.serve(address)

    async def run() -> None:
        await asyncio.gather(reconciler.run(), feed.follow(bus), watcher.run(), serve())

    return run
