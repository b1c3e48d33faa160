"""grpc.aio bootstrap of the control plane: interceptors, health, reflection, metrics, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane.api.admin import AdminServicer
from controlplane.api.interceptors import AuthInterceptor, ErrorInterceptor
from controlplane.api.unbuilt import (
    UnbuiltJobService,
    UnbuiltLedgerService,
    UnbuiltRegistryService,
)
from controlplane.auth.service import AuthService
from controlplane.db import migrate
from controlplane.db.engine import Database
from controlplane.metrics import Metrics
from controlplane.settings import Settings
from gpuplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


class ControlPlane:
    """One control-plane process: `await start()`, then `port`; `await stop()` drains it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.db: Database | None = None
        self.server: aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.admin_key_file: str | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url()
        await asyncio.to_thread(migrate.upgrade, url)
        self.db = Database(url)
        auth = AuthService(self.db, cache_ttl=settings.auth_cache_ttl_seconds)
        key_file = await auth.ensure_bootstrap_admin(
            settings.bootstrap_admin_key.get_secret_value()
            if settings.bootstrap_admin_key
            else None,
            settings.data_dir,
        )
        self.admin_key_file = str(key_file) if key_file else None

        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        server = aio.server(
            interceptors=[ErrorInterceptor(self.metrics), AuthInterceptor(auth.authenticate)],
            options=options,
        )
        jobs_pb2_grpc.add_JobServiceServicer_to_server(UnbuiltJobService(), server)
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(UnbuiltRegistryService(), server)
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(UnbuiltLedgerService(), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(auth), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(settings.listen_addr)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen_addr}")
        await server.start()
        self.server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if settings.metrics_addr:
            self.metrics_port = self.metrics.serve(settings.metrics_addr)
        self.metrics.up.set(1)
        host = settings.listen_addr.rpartition(":")[0]
        log.info("control plane serving gRPC on %s:%d", host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking new RPCs, lets running ones finish for `grace` seconds, then closes."""
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
            self.server = None
        self.metrics.up.set(0)
        self.metrics.stop()
        if self.db is not None:
            await self.db.close()
            self.db = None
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()


async def serve(settings: Settings) -> None:
    """Runs a control plane until SIGINT or SIGTERM, then shuts it down gracefully."""
    control_plane = ControlPlane(settings)
    await control_plane.start()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not stopping:
            log.info("shutting down (grace %.1fs)", settings.shutdown_grace_seconds)
            stopping.append(asyncio.create_task(control_plane.stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await control_plane.wait()


def insecure_channel(target: str) -> aio.Channel:
    """A client channel to a control plane (plaintext; TLS arrives with scale-out)."""
    return aio.insecure_channel(target)


__all__ = ["ControlPlane", "grpc", "insecure_channel", "serve"]
