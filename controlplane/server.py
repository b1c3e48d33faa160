"""grpc.aio bootstrap of the control plane: interceptors, health, reflection, metrics, shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from datetime import timedelta

import grpc
import urllib3
from gpuplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    types_pb2,
)
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controlplane import gauges
from controlplane.api.admin import AdminServicer
from controlplane.api.interceptors import AuthInterceptor, ErrorInterceptor, RateLimiter
from controlplane.api.jobs import JobServicer
from controlplane.api.ledger import LedgerServicer
from controlplane.api.registry import RegistryServicer
from controlplane.auth.service import AuthService
from controlplane.background import Background
from controlplane.bus import Bus
from controlplane.db import migrate
from controlplane.db.engine import Database
from controlplane.jobs.logs import LogReader
from controlplane.jobs.notify import Notifier
from controlplane.jobs.service import JobPolicy, JobService
from controlplane.ledger.service import LedgerService
from controlplane.metrics import Metrics
from controlplane.registry.monitor import GpuMonitor, MonitorPolicy
from controlplane.registry.natsauth import NatsAuth
from controlplane.registry.service import RegistryService
from controlplane.scheduler.leader import PostgresLeader, SoleLeader, leadership_for
from controlplane.scheduler.quote import Quoter
from controlplane.scheduler.service import CycleStats, Scheduler, scheduler_policy
from controlplane.settings import Settings
from controlplane.tls import server_credentials
from messaging.natsjwt import Permissions
from messaging.tls import nats_tls_context
from storage.objects import ObjectStore

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
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self.metrics_port = 0
        self.admin_key_file: str | None = None
        # NATS auth (operator mode) when the seeds are set: our own user has no limits.
        self.nats_keys = settings.nats_keys()
        self.bus = Bus(
            settings.nats_url,
            settings.nats_stream_replicas,
            tls=nats_tls_context(
                settings.nats_ca_file, settings.nats_cert_file, settings.nats_key_file
            ),
            credentials=self.nats_keys.user_creds("gpuplane-controlplane", Permissions())
            if self.nats_keys
            else "",
        )
        self.nats_auth: NatsAuth | None = None
        self.notifier = Notifier()
        self.background: Background | None = None
        self.scheduler: Scheduler | None = None
        self.jobs: JobService | None = None
        self.registry: RegistryService | None = None
        self.leader: SoleLeader | PostgresLeader | None = None
        self.store = ObjectStore(
            settings.s3_endpoint,
            settings.s3_access_key,
            settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            bucket=settings.s3_bucket,
            # Fail fast and let callers retry: the SDK's default retries block a worker
            # thread for many seconds per call while the server is down.
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=2.0, read=30.0),
                retries=urllib3.Retry(total=2, backoff_factor=0.2),
            ),
        )
        self._stopped = asyncio.Event()
        self._bucket_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        # Read before anything starts: a missing or broken PEM file fails start-up, naming it.
        credentials = server_credentials(settings)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url()
        await asyncio.to_thread(migrate.upgrade, url)
        self.db = Database(url)
        db = self.db
        if self.nats_keys is not None:
            self.nats_auth = NatsAuth(self.nats_keys, self.bus.servers, db, tls=self.bus.tls)
        monitor = GpuMonitor(
            db,
            MonitorPolicy(
                history=settings.telemetry_history,
                clean_period_seconds=settings.gpu_clean_period_seconds,
                max_clock_skew_seconds=settings.telemetry_max_clock_skew_seconds,
                ignored_xids=tuple(settings.gpu_ignored_xids),
                usage_max_attempts=settings.job_usage_max_attempts,
                forget_after_seconds=settings.heartbeat_timeout_ms / 1000,
            ),
        )
        self.metrics.watch_telemetry(monitor)
        self.registry = registry = RegistryService(
            db,
            max_price=settings.max_price_per_gpu_hour_micro_credits,
            monitor=monitor,
            # The liveness loop's tick, which flushes heartbeats (background.py).
            heartbeat_write_interval=min(1.0, settings.heartbeat_timeout_ms / 4000),
            nats_auth=self.nats_auth,
        )
        auth = AuthService(
            db, cache_ttl=settings.auth_cache_ttl_seconds, fallback=registry.authenticate_host
        )
        policy = JobPolicy(
            fee_basis_points=settings.platform_fee_basis_points,
            default_max_price=settings.max_price_per_gpu_hour_micro_credits,
            allow_simulated_by_default=settings.allow_simulated_by_default,
            retry_backoff=timedelta(milliseconds=settings.retry_backoff_ms),
            dispatch_ack_timeout=timedelta(milliseconds=settings.dispatch_ack_timeout_ms),
            hold_queue_timeout=timedelta(seconds=settings.hold_queue_timeout_seconds),
        )
        ledger = LedgerService(db, min_payout=settings.min_payout_micro_credits)
        self.jobs = jobs = JobService(db, policy, registry.sessions, self.notifier, ledger)
        self.leader = leadership_for(
            db,
            check_interval=settings.scheduler_leader_check_interval_ms / 1000,
            ttl=settings.scheduler_lease_ttl_ms / 1000,
            on_change=self._leadership_changed,
        )
        scheduling = scheduler_policy(settings)
        self.scheduler = scheduler = Scheduler(
            db, self.notifier, settings.s3_bucket, fence=self.leader.fence, policy=scheduling
        )
        scheduler.on_cycle = self._observe_cycle
        pricing = types_pb2.PricingPolicy(
            platform_fee_basis_points=settings.platform_fee_basis_points,
            min_price_per_gpu_hour_micro_credits=settings.min_price_per_gpu_hour_micro_credits,
            max_price_per_gpu_hour_micro_credits=settings.max_price_per_gpu_hour_micro_credits,
            min_payout_micro_credits=settings.min_payout_micro_credits,
        )
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
            interceptors=[
                ErrorInterceptor(self.metrics),
                AuthInterceptor(
                    auth.authenticate,
                    RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst),
                ),
            ],
            options=options,
        )
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(
                jobs,
                Quoter(
                    db,
                    settings.max_price_per_gpu_hour_micro_credits,
                    scheduling.default_policy,
                ),
                self.notifier,
                self.store,
                LogReader(db, self.bus, self.store),
                usage=monitor.usage_of,
            ),
            server,
        )
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(
            RegistryServicer(
                registry,
                jobs,
                nats_servers=self.bus.servers,
                heartbeat_interval_ms=settings.heartbeat_interval_ms,
                telemetry_interval_ms=settings.telemetry_interval_ms,
                forget_principal=auth.forget,
            ),
            server,
        )
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
            LedgerServicer(ledger),
            server,
        )
        admin_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(auth, registry, pricing), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if credentials is None:
            self.port = server.add_insecure_port(settings.listen_addr)
        else:
            self.port = server.add_secure_port(settings.listen_addr, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.listen_addr}")
        await server.start()
        self.server = server
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if settings.metrics_addr:
            self.metrics_port = self.metrics.serve(settings.metrics_addr)
        self.background = Background(
            bus=self.bus,
            notifier=self.notifier,
            scheduler=scheduler,
            jobs=jobs,
            registry=registry,
            scheduler_interval=settings.scheduler_interval_ms / 1000,
            heartbeat_timeout=settings.heartbeat_timeout_ms / 1000,
            hold_expiry_interval=settings.hold_expiry_interval_ms / 1000,
            leader=self.leader,
            nats_auth=self.nats_auth,
            nats_account_sync_interval=settings.nats_account_sync_interval_seconds,
            on_report_dropped=lambda reason: self.metrics.reports_dropped.labels(reason).inc(),
            refresh_gauges=lambda: gauges.refresh(db, self.metrics),
            gauges_interval=settings.metrics_refresh_seconds,
        )
        self.background.start()
        self._bucket_task = asyncio.create_task(self._ensure_bucket())
        self.metrics.up.set(1)
        host = settings.listen_addr.rpartition(":")[0]
        certs = settings.tls_client_auth
        mode = "plaintext" if credentials is None else f"TLS, client certificates: {certs}"
        log.info("control plane serving gRPC on %s:%d (%s)", host, self.port, mode)

    async def stop(self, grace: float | None = None) -> None:
        """Stops taking new RPCs, lets running ones finish for `grace` seconds, then closes.
        Scheduling stops first, so another replica takes leadership over during the grace."""
        if self.background is not None:
            await self.background.stop_scheduling()
        elif self.leader is not None:
            await self.leader.release()
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
            self.server = None
        if self.background is not None:
            await self.background.stop()
            self.background = None
        if self._bucket_task is not None:
            self._bucket_task.cancel()
            self._bucket_task = None
        await self.bus.close()
        self.metrics.up.set(0)
        self.metrics.stop()
        if self.db is not None:
            await self.db.close()
            self.db = None
        self._stopped.set()

    def _leadership_changed(self, leading: bool) -> None:
        self.metrics.scheduler_leader.set(1 if leading else 0)
        if leading:
            if self.scheduler is not None:
                # Another replica may have led meanwhile: start fair share from history.
                self.scheduler.reset()
            self.notifier.schedule.set()

    def _observe_cycle(self, cycle: CycleStats) -> None:
        self.metrics.scheduler_cycle_seconds.observe(cycle.seconds)
        self.metrics.jobs_placed.inc(cycle.placed)

    async def _ensure_bucket(self) -> None:
        """Creates the results bucket, retrying while the S3 server is unreachable."""
        delay = 0.2
        while True:
            try:
                await self.store.ensure_bucket()
                return
            except Exception as error:  # noqa: BLE001 - S3 SDK errors vary; keep trying
                log.warning("object storage not ready (%s); retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def wait(self) -> None:
        await self._stopped.wait()


def settle_heap() -> None:
    """Puts what start-up allocated (modules, ORM metadata, caches: never garbage) out of the
    cyclic garbage collector's reach, so its full collections stay short on a busy process
    instead of walking that heap each time (pauses of 100+ ms under telemetry load)."""
    gc.collect()
    gc.freeze()


async def serve(settings: Settings) -> None:
    """Runs a control plane until SIGINT or SIGTERM, then shuts it down gracefully."""
    control_plane = ControlPlane(settings)
    await control_plane.start()
    settle_heap()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        if not stopping:
            log.info("shutting down (grace %.1fs)", settings.shutdown_grace_seconds)
            stopping.append(asyncio.create_task(control_plane.stop()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await control_plane.wait()


__all__ = ["ControlPlane", "grpc", "serve", "settle_heap"]
