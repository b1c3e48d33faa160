"""The one test harness: an in-process control plane on port 0 (SQLite in a temp dir or a
PostgreSQL database), wired to real NATS and S3, with a funded consumer and a provider."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from gpuplane.v1 import (
    admin_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    types_pb2,
)

from controlplane.server import ControlPlane
from controlplane.settings import Settings
from daemon.channel import PLAINTEXT, ChannelSecurity, open_channel
from devstack.certs import TestCerts
from devstack.factories import CREDIT, bearer, deposit, new_job, new_tenant, new_token
from tests.dbseed import seed_sqlite

__all__ = ["CREDIT", "JobPlane", "job_plane", "open_plane"]


@dataclass
class JobPlane:
    """A running control plane as a test drives it: the in-process plane, a channel to it and
    its admin key (a devstack.factories.Reachable); job_plane() adds the tenants."""

    plane: ControlPlane
    address: str
    admin_key: str
    channel: grpc.aio.Channel
    nats_url: str
    consumer_tenant: str = ""
    consumer_key: str = ""
    provider_tenant: str = ""
    # Set: gRPC and NATS both TLS, and the control plane requires client certificates.
    tls: TestCerts | None = None

    def daemon_tls(self) -> dict[str, Any]:
        """DaemonSettings fields to reach this plane and its NATS (client certificates)."""
        if self.tls is None:
            return {"plaintext": True}
        certs = self.tls
        return {
            "tls_ca_file": certs.ca_cert,
            "tls_cert_file": certs.client_cert,
            "tls_key_file": certs.client_key,
            "nats_ca_file": certs.ca_cert,
            "nats_cert_file": certs.client_cert,
            "nats_key_file": certs.client_key,
        }

    def auth(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        return bearer(key or self.admin_key)

    async def token(self, **fields: Any) -> str:
        """The secret of a fresh registration token for the provider (devstack.factories)."""
        return str((await new_token(self, self.provider_tenant, **fields)).secret)

    @property
    def jobs(self) -> jobs_pb2_grpc.JobServiceAsyncStub:
        return jobs_pb2_grpc.JobServiceStub(self.channel)

    @property
    def ledger(self) -> ledger_pb2_grpc.LedgerServiceAsyncStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel)

    @property
    def admin(self) -> admin_pb2_grpc.AdminServiceAsyncStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel)

    async def submit(self, **spec: Any) -> types_pb2.Job:
        """A job of the consumer's (devstack.factories.new_job)."""
        return await new_job(self, self.consumer_key, **spec)

    async def get(self, job_id: str) -> types_pb2.Job:
        reply = await self.jobs.GetJob(
            jobs_pb2.GetJobRequest(job_id=job_id), metadata=self.auth(self.consumer_key)
        )
        return reply.job

    async def wait_for(
        self, job_id: str, states: Iterable[int], timeout: float = 20.0
    ) -> types_pb2.Job:
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.state in wanted:
                return job
            if time.monotonic() > deadline:
                names = [types_pb2.JobState.Name(s) for s in wanted]  # type: ignore[arg-type]
                raise AssertionError(
                    f"job {job_id} is {types_pb2.JobState.Name(job.state)} "
                    f"({job.state_reason}), not in {names} after {timeout}s"
                )
            await asyncio.sleep(0.05)

    async def balance(self, tenant_id: str) -> types_pb2.Balance:
        reply = await self.ledger.GetBalance(
            ledger_pb2.GetBalanceRequest(tenant_id=tenant_id), metadata=self.auth()
        )
        return reply.balance

    async def deposit(self, tenant_id: str, credits: int, key: str) -> None:
        await deposit(self, tenant_id, credits * CREDIT, key)

    async def assert_ledger_consistent(self) -> ledger_pb2.CheckLedgerResponse:
        report = await self.ledger.CheckLedger(
            ledger_pb2.CheckLedgerRequest(), metadata=self.auth()
        )
        assert report.balance_sum_micro_credits == 0
        assert list(report.mismatches) == []
        assert report.consistent
        return report


@asynccontextmanager
async def job_plane(
    data_dir: Path,
    nats_url: str,
    s3: Any,
    database_url: str = "",
    configure: Callable[[dict[str, Any]], None] | None = None,
    tls: TestCerts | None = None,
) -> AsyncIterator[JobPlane]:
    """A running control plane with a consumer (100 credits) and a provider tenant. With
    `tls`: gRPC over TLS requiring client certificates, NATS (`nats_url`) over TLS."""
    options: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "listen_addr": "127.0.0.1:0",
        "metrics_addr": "127.0.0.1:0",
        "nats_url": nats_url,
        "s3_endpoint": s3.endpoint,
        "s3_access_key": s3.access_key,
        "s3_secret_key": s3.secret_key,
        "heartbeat_interval_ms": 200,
        "heartbeat_timeout_ms": 1500,
        "scheduler_interval_ms": 100,
        "metrics_refresh_seconds": 0.2,
        "retry_backoff_ms": 50,
        "job_usage_flush_seconds": 0.2,
        # Scripted hosts report simulated run times (an hour within a second): the control
        # plane's clock bound (jobs/clock.py) is off here; its own tests set the default back.
        "run_time_slack_ms": 86_400_000,
        "allow_simulated_by_default": True,
        # Tests not about hardware verification run on simulated (never verified) hosts;
        # tests/reliability/test_verification.py turns this off.
        "allow_unverified_by_default": True,
        "probe_allowance_ms": 10_000,
        "probe_n": 16,
        "probe_rounds": 2,
        "allow_plaintext": tls is None,
    }
    security = PLAINTEXT
    if tls is not None:
        options.update(
            tls_cert_file=tls.server_cert,
            tls_key_file=tls.server_key,
            tls_client_ca_file=tls.ca_cert,
            tls_client_auth="require",
            nats_ca_file=tls.ca_cert,
            nats_cert_file=tls.client_cert,
            nats_key_file=tls.client_key,
        )
        security = ChannelSecurity(
            ca_file=tls.ca_cert, cert_file=tls.client_cert, key_file=tls.client_key
        )
    if configure is not None:
        configure(options)
    async with open_plane(Settings(**options), security, tls) as running:
        await asyncio.wait_for(running.plane.bus.ready.wait(), timeout=15)
        running.consumer_tenant, running.consumer_key = await new_tenant(
            running, "consumer", types_pb2.ROLE_CONSUMER
        )
        running.provider_tenant, _ = await new_tenant(running, "provider", types_pb2.ROLE_PROVIDER)
        await running.deposit(running.consumer_tenant, 100, "initial")
        yield running


@asynccontextmanager
async def open_plane(
    settings: Settings,
    security: ChannelSecurity = PLAINTEXT,
    tls: TestCerts | None = None,
    *,
    expect_grpc_restarts: bool = False,
) -> AsyncIterator[JobPlane]:
    """Starts a control plane on `settings` and opens a channel to it; stops both after. No
    tenants: job_plane() adds them; a bare plane (no NATS) serves the admin API alone. Fails
    if grpc.aio stopped its gRPC server by itself, unless `expect_grpc_restarts`."""
    if not settings.database_url:  # SQLite in data_dir: a copy of a database migrated once
        await asyncio.to_thread(seed_sqlite, settings.data_dir)
    plane = ControlPlane(settings)
    await plane.start()
    try:
        if settings.bootstrap_admin_key is not None:  # replicas sharing one configured key
            admin_key = settings.bootstrap_admin_key.get_secret_value()
        else:
            assert plane.admin_key_file is not None
            admin_key = Path(plane.admin_key_file).read_text().strip()
        address = f"127.0.0.1:{plane.port}"  # TLS: verified against the certificate's IP SAN
        channel = open_channel(address, security)
        try:
            yield JobPlane(plane, address, admin_key, channel, settings.nats_url, tls=tls)
        finally:
            await channel.close(None)
    finally:
        await plane.stop(grace=0)
        # grpc.aio stopping the server by itself is a bug whatever the test was about (and
        # the likely cause of its failure, if it failed: this says why).
        if plane.grpc_restarts and not expect_grpc_restarts:
            raise AssertionError(
                f"grpc.aio stopped the control plane's gRPC server by itself "
                f"{plane.grpc_restarts} time(s) (controlplane/api/keeper.py): "
                f"{plane.grpc_failures!r}"
            )
