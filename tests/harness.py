"""A control plane wired to real NATS and S3 for job-path tests, plus waiting helpers."""

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
    admin_pb2,
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

CREDIT = 1_000_000


@dataclass
class JobPlane:
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
        return (("authorization", f"Bearer {key or self.admin_key}"),)

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
        spec.setdefault("image", "gpuplane-test/busybox:1")
        spec.setdefault("max_duration_seconds", 600)
        spec.setdefault("max_price_per_gpu_hour_micro_credits", 2 * CREDIT)
        reply = await self.jobs.SubmitJob(
            jobs_pb2.SubmitJobRequest(spec=types_pb2.JobSpec(**spec)),
            metadata=self.auth(self.consumer_key),
        )
        return reply.job

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
        await self.ledger.Deposit(
            ledger_pb2.DepositRequest(
                tenant_id=tenant_id, amount_micro_credits=credits * CREDIT, idempotency_key=key
            ),
            metadata=self.auth(),
        )

    async def assert_ledger_consistent(self) -> ledger_pb2.CheckLedgerResponse:
        report = await self.ledger.CheckLedger(
            ledger_pb2.CheckLedgerRequest(), metadata=self.auth()
        )
        assert report.balance_sum_micro_credits == 0
        assert list(report.mismatches) == []
        assert report.consistent
        return report


async def new_tenant(plane: JobPlane, name: str, role: types_pb2.Role.ValueType) -> tuple[str, str]:
    tenant = await plane.admin.CreateTenant(
        admin_pb2.CreateTenantRequest(name=name), metadata=plane.auth()
    )
    key = await plane.admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=tenant.tenant.tenant_id, role=role),
        metadata=plane.auth(),
    )
    return tenant.tenant.tenant_id, key.secret


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
        "allow_simulated_by_default": True,
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
    plane = ControlPlane(Settings(**options))
    await plane.start()
    await asyncio.wait_for(plane.bus.ready.wait(), timeout=15)
    assert plane.admin_key_file is not None
    admin_key = Path(plane.admin_key_file).read_text().strip()
    address = f"127.0.0.1:{plane.port}"  # TLS: verified against the certificate's IP SAN
    channel = open_channel(address, security)
    running = JobPlane(plane, address, admin_key, channel, nats_url, tls=tls)
    try:
        running.consumer_tenant, running.consumer_key = await new_tenant(
            running, "consumer", types_pb2.ROLE_CONSUMER
        )
        running.provider_tenant, _ = await new_tenant(running, "provider", types_pb2.ROLE_PROVIDER)
        await running.deposit(running.consumer_tenant, 100, "initial")
        yield running
    finally:
        await channel.close(None)
        await plane.stop(grace=0)
