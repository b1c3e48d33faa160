"""Idempotency keys are scoped to the caller's tenant: every RPC whose request has an
`idempotency_key` (found in the proto descriptors, so a new one is covered or fails here)
gets the same key from callers of two tenants, and each gets its own result; the same key
again from the first answers the first's result. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf.message import Message
from gpuplane.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    data_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    messaging_pb2,
    registry_pb2,
    services_pb2,
    services_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    types_pb2,
)

from controlplane.auth.policy import allowed_roles
from controlplane.auth.principal import Role
from devstack.factories import (
    CREDIT,
    bearer,
    job_spec,
    new_job,
    new_online_host,
    new_tenant,
    new_token,
)
from tests.harness import JobPlane
from tests.reliability import summary

pytestmark = [
    pytest.mark.databases("sqlite", "postgresql"),
    # The hosts made here never heartbeat: they must not be lost while their job runs.
    # Self-service on: two providers each mint their own registration tokens with one key.
    pytest.mark.plane(heartbeat_timeout_ms=600_000, self_service_providers=True),
    pytest.mark.timeout(180),
]
KEY = "same-key-from-two-tenants"
Kind = messaging_pb2.JobReportKind


def keyed_methods() -> dict[str, str]:
    """Every RPC whose request carries an idempotency key: name → full method path."""
    found = {}
    for module in (
        jobs_pb2,
        registry_pb2,
        ledger_pb2,
        admin_pb2,
        data_pb2,
        sessions_pb2,
        services_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if "idempotency_key" in method.input_type.fields_by_name:
                    found[method.name] = f"/{service.full_name}/{method.name}"
    return found


@dataclass
class Caller:
    """A caller of one tenant, with the things its requests name."""

    tenant_id: str
    key: str
    # A job of the plane's consumer charged on this caller's behalf (RefundJob), and the
    # consumer whose credit Deposit adds to.
    job_id: str = ""
    deposit_to: str = ""
    # The caller's service "web" (DeployService's case made it), for CreateServiceKey.
    service_id: str = ""


@dataclass(frozen=True)
class Case:
    """One RPC: its request from `caller`, how to call it, and what identifies a result
    and who it belongs to."""

    request: Callable[[Caller], Message]
    call: Callable[[JobPlane], Callable[..., Awaitable[Any]]]
    result_id: Callable[[Any], str]
    owner: Callable[[Any, Caller], bool]


CASES: dict[str, Case] = {
    "SubmitJob": Case(
        lambda c: jobs_pb2.SubmitJobRequest(spec=job_spec(gpu_count=1), idempotency_key=KEY),
        lambda p: jobs_pb2_grpc.JobServiceStub(p.channel).SubmitJob,
        lambda r: r.job.job_id,
        lambda r, c: r.job.tenant_id == c.tenant_id and r.job.idempotency_key == KEY,
    ),
    "CreateSession": Case(
        lambda c: sessions_pb2.CreateSessionRequest(
            spec=types_pb2.JobSpec(image="busybox", gpu_count=1),
            duration_seconds=60,
            idempotency_key=KEY,
        ),
        lambda p: sessions_pb2_grpc.SessionServiceStub(p.channel).CreateSession,
        lambda r: r.session.session_id,
        lambda r, c: r.session.tenant_id == c.tenant_id,
    ),
    "DeployService": Case(
        lambda c: services_pb2.DeployServiceRequest(
            name="web",
            spec=types_pb2.JobSpec(image="busybox", gpu_count=1),
            port=8080,
            replicas=0,
            idempotency_key=KEY,
        ),
        lambda p: services_pb2_grpc.ServiceServiceStub(p.channel).DeployService,
        lambda r: r.service.service_id,
        lambda r, c: r.service.tenant_id == c.tenant_id,
    ),
    "CreateServiceKey": Case(
        lambda c: services_pb2.CreateServiceKeyRequest(
            service="web", description="caller", idempotency_key=KEY
        ),
        lambda p: services_pb2_grpc.ServiceServiceStub(p.channel).CreateServiceKey,
        lambda r: r.key.key_id,
        lambda r, c: bool(r.secret) and r.key.service_id == c.service_id,
    ),
    "CreateRegistrationToken": Case(
        # The case: the same request (own provider, same label) from two providers.
        lambda c: admin_pb2.CreateRegistrationTokenRequest(label="rack", idempotency_key=KEY),
        lambda p: admin_pb2_grpc.AdminServiceStub(p.channel).CreateRegistrationToken,
        lambda r: r.token.token_id,
        lambda r, c: r.token.provider_tenant_id == c.tenant_id,
    ),
    "Payout": Case(
        lambda c: ledger_pb2.PayoutRequest(
            amount_micro_credits=CREDIT, destination="iban:1", idempotency_key=KEY
        ),
        lambda p: ledger_pb2_grpc.LedgerServiceStub(p.channel).Payout,
        lambda r: r.payout_id,
        lambda r, c: r.balance.tenant_id == c.tenant_id,
    ),
    "Deposit": Case(
        lambda c: ledger_pb2.DepositRequest(
            tenant_id=c.deposit_to, amount_micro_credits=CREDIT, idempotency_key=KEY
        ),
        lambda p: ledger_pb2_grpc.LedgerServiceStub(p.channel).Deposit,
        lambda r: r.transfer_id,
        lambda r, c: r.balance.tenant_id == c.deposit_to,
    ),
    "RefundJob": Case(
        lambda c: ledger_pb2.RefundJobRequest(
            job_id=c.job_id, amount_micro_credits=1000, reason="slow", idempotency_key=KEY
        ),
        lambda p: ledger_pb2_grpc.LedgerServiceStub(p.channel).RefundJob,
        lambda r: r.transfer_id,
        lambda r, c: r.refunded_micro_credits == 1000,
    ),
    "CreateTenant": Case(
        # Names are global, so each admin names its own; the key is the same.
        lambda c: admin_pb2.CreateTenantRequest(name=f"made-by-{c.tenant_id}", idempotency_key=KEY),
        lambda p: admin_pb2_grpc.AdminServiceStub(p.channel).CreateTenant,
        lambda r: r.tenant.tenant_id,
        lambda r, c: r.tenant.name == f"made-by-{c.tenant_id}",
    ),
    "CreateApiKey": Case(
        # The same request from two admins: each gets a key of its own, with its secret.
        lambda c: admin_pb2.CreateApiKeyRequest(
            tenant_id=c.deposit_to, role=types_pb2.ROLE_CONSUMER, idempotency_key=KEY
        ),
        lambda p: admin_pb2_grpc.AdminServiceStub(p.channel).CreateApiKey,
        lambda r: r.key.key_id,
        lambda r, c: bool(r.secret) and r.key.tenant_id == c.deposit_to,
    ),
}


def test_every_rpc_with_an_idempotency_key_has_a_case() -> None:
    assert set(keyed_methods()) == set(CASES), "add a Case for each RPC taking a key"


async def charged_job(plane: JobPlane, provider: str, location: str) -> str:
    """A job of the plane's consumer run on a host of `provider` and charged 2 credits (an
    hour at 2 credits per GPU-hour): the provider earns, and the job can be refunded."""
    token = await new_token(plane, provider)
    host = await new_online_host(plane.channel, token.secret, location=location)
    job = await new_job(
        plane, plane.consumer_key, gpu_count=1, locations=[location], max_duration_seconds=7200
    )
    await plane.wait_for(job.job_id, {types_pb2.JOB_STATE_SCHEDULED})
    jobs = plane.plane.jobs
    assert jobs is not None
    running = messaging_pb2.JobReport(
        job_id=job.job_id, attempt=1, host_id=host.host_id, seq=1, kind=Kind.JOB_REPORT_KIND_RUNNING
    )
    assert await jobs.apply_report(running, host.host_id)
    finished = messaging_pb2.JobReport(
        job_id=job.job_id,
        attempt=1,
        host_id=host.host_id,
        seq=2,
        kind=Kind.JOB_REPORT_KIND_FINISHED,
        exit_code=0,
        run_time_ms=3_600_000,
        stop_reason=messaging_pb2.STOP_REASON_COMPLETED,
    )
    assert await jobs.apply_report(finished, host.host_id)
    done = await plane.wait_for(job.job_id, {types_pb2.JOB_STATE_SUCCEEDED})
    assert done.charged_micro_credits == 2 * CREDIT
    return job.job_id


async def two_callers(plane: JobPlane, role: Role) -> tuple[Caller, Caller]:
    """Callers of two tenants with `role`; the consumers are funded, the providers have
    earnings, and the admins each have a charged job to refund and a consumer to credit."""
    if role is Role.CONSUMER:
        other = await new_tenant(plane, "consumer-b", micro_credits=100 * CREDIT)
        return Caller(plane.consumer_tenant, plane.consumer_key), Caller(*other)
    if role is Role.PROVIDER:
        first = await new_tenant(plane, "provider-a", types_pb2.ROLE_PROVIDER)
        second = await new_tenant(plane, "provider-b", types_pb2.ROLE_PROVIDER)
        for n, provider in enumerate((first, second)):
            await charged_job(plane, provider.tenant_id, f"lab-{n}")
        return Caller(*first), Caller(*second)
    other_admin = await new_tenant(plane, "operators-b", types_pb2.ROLE_ADMIN)
    platform = Caller("platform", plane.admin_key)
    admins = (platform, Caller(*other_admin))
    provider = await new_tenant(plane, "provider-r", types_pb2.ROLE_PROVIDER)
    for n, admin in enumerate(admins):
        admin.job_id = await charged_job(plane, provider.tenant_id, f"refund-lab-{n}")
        admin.deposit_to = plane.consumer_tenant
    return admins


def role_for(method: str) -> Role:
    """The least privileged role the policy lets call `method` (a tenant's own key space)."""
    roles = allowed_roles(method)
    for role in (Role.CONSUMER, Role.PROVIDER, Role.ADMIN):
        if role in roles:
            return role
    raise AssertionError(f"nobody may call {method}")


async def test_the_same_key_from_two_tenants_gets_each_its_own_result(plane: JobPlane) -> None:
    methods = keyed_methods()
    callers: dict[Role, tuple[Caller, Caller]] = {}
    tried = 0
    # A caller key needs its service: DeployService's case first.
    for name, path in sorted(methods.items(), key=lambda m: (m[0] == "CreateServiceKey", m[0])):
        case, role = CASES[name], role_for(path)
        if role not in callers:
            callers[role] = await two_callers(plane, role)
        first, second = callers[role]
        call = case.call(plane)
        one = await call(case.request(first), metadata=bearer(first.key))
        two = await call(case.request(second), metadata=bearer(second.key))
        again = await call(case.request(first), metadata=bearer(first.key))
        tried += 3
        assert case.result_id(one) != case.result_id(two), f"{name}: one result for both"
        assert case.owner(one, first), f"{name}: {one}"
        assert case.owner(two, second), f"{name}: the second tenant got {two}"
        assert case.result_id(again) == case.result_id(one), f"{name}: the replay differs"
        if name == "DeployService":
            first.service_id, second.service_id = one.service.service_id, two.service.service_id
    await plane.assert_ledger_consistent()
    summary.record(
        "idempotency keys scoped per tenant",
        f"{len(methods)} RPCs ({', '.join(sorted(methods))}): one key from two tenants each, "
        "each answered its own result, a replay its first",
        requests_tried=tried,
    )
