"""The authorisation matrix: every RPC called by every kind of caller, checked against the
intended table below; tenants never see each other's jobs, logs, results, ledger or usage;
presigned result URLs are scoped to one job's attempt prefix and expire."""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from gpuplane.v1 import (
    admin_pb2,
    data_pb2,
    data_pb2_grpc,
    jobs_pb2,
    ledger_pb2,
    messaging_pb2,
    registry_pb2,
    services_pb2,
    services_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    tunnels_pb2,
    types_pb2,
)

from controlplane.auth.policy import ALLOWED_ROLES, PUBLIC_METHODS
from devstack.factories import new_tenant
from tests.controlplane.browser import Browser, browser_cell, dashboard_url, logged_in
from tests.controlplane.scripted_host import ScriptedHost
from tests.harness import CREDIT, JobPlane, job_plane
from tests.reliability import summary

K = messaging_pb2
CALLERS = (
    "admin",
    "consumer",
    "other_consumer",
    "provider",
    "other_provider",
    "host",
    "no_key",
    "revoked",
)
ALLOW, DENY, UNAUTH, HIDDEN = "allowed", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"


def table(default: str = DENY, **overrides: str) -> dict[str, str]:
    """A row: `default` for every authenticated caller except `overrides`; no key and a
    revoked key are always UNAUTHENTICATED."""
    row = {c: default for c in CALLERS}
    row.update(no_key=UNAUTH, revoked=UNAUTH)
    row.update(overrides)
    return row


# What each caller is meant to get when it calls the RPC on the consumer's (or the
# provider's) resource. "other_*" callers are tenants that do not own it: where the request
# names a resource by id its existence is hidden (NOT_FOUND); where it names another tenant
# explicitly, the answer is PERMISSION_DENIED.
OWNED_JOB = table(admin=ALLOW, consumer=ALLOW, other_consumer=HIDDEN)
OWN_TENANT = table(admin=ALLOW, consumer=ALLOW)  # tenant_id = the consumer's
PROVIDER_TENANT = table(admin=ALLOW, provider=ALLOW)  # provider_tenant_id = the provider's
OWNED_HOST = table(admin=ALLOW, provider=ALLOW, other_provider=HIDDEN)
ADMIN_ONLY = table(admin=ALLOW)
SIGNED_IN = table(ALLOW, host=DENY)
# DataService acts in the caller's own input area: every consumer (and admin) has one.
OWN_INPUT_AREA = table(admin=ALLOW, consumer=ALLOW, other_consumer=ALLOW)
# A key only the consumer uploaded: absent from everyone else's input area.
OWNED_INPUT = table(admin=HIDDEN, consumer=ALLOW, other_consumer=HIDDEN)
INPUT_KEY = "authz/input.bin"
# Every module with a service: the table must name each of their RPCs.
SERVICE_MODULES = (
    jobs_pb2,
    registry_pb2,
    ledger_pb2,
    admin_pb2,
    data_pb2,
    sessions_pb2,
    tunnels_pb2,
    services_pb2,
)
EXPECTED: dict[str, dict[str, str]] = {
    "JobService/SubmitJob": table(admin=ALLOW, consumer=ALLOW, other_consumer=ALLOW),
    "JobService/GetJob": OWNED_JOB,
    "JobService/ListJobs": OWN_TENANT,
    "JobService/CancelJob": OWNED_JOB,
    "JobService/WatchJob": OWNED_JOB,
    "JobService/StreamLogs": OWNED_JOB,
    "JobService/GetResults": OWNED_JOB,
    "JobService/GetJobEfficiency": OWNED_JOB,
    "SessionService/CreateSession": table(admin=ALLOW, consumer=ALLOW, other_consumer=ALLOW),
    "SessionService/GetSession": OWNED_JOB,
    "SessionService/ListSessions": OWN_TENANT,
    "SessionService/ExtendSession": OWNED_JOB,
    "SessionService/FinishSession": OWNED_JOB,
    "SessionService/DestroySession": OWNED_JOB,
    "ServiceService/DeployService": table(admin=ALLOW, consumer=ALLOW, other_consumer=ALLOW),
    "ServiceService/GetService": OWNED_JOB,
    "ServiceService/ListServices": OWN_TENANT,
    "ServiceService/ScaleService": OWNED_JOB,
    "ServiceService/StopService": OWNED_JOB,
    "ServiceService/StartService": OWNED_JOB,
    "ServiceService/DeleteService": OWNED_JOB,
    "ServiceService/CreateServiceKey": OWNED_JOB,
    "ServiceService/ListServiceKeys": OWNED_JOB,
    "ServiceService/RevokeServiceKey": OWNED_JOB,
    "DataService/CreateUpload": OWN_INPUT_AREA,
    "DataService/CompleteUpload": OWNED_INPUT,
    "DataService/AbortUpload": OWN_INPUT_AREA,
    "DataService/ListInputs": OWN_INPUT_AREA,
    "DataService/DeleteInput": OWNED_INPUT,
    "RegistryService/Connect": table(host=ALLOW),
    "RegistryService/ListHosts": PROVIDER_TENANT,
    "RegistryService/GetHost": OWNED_HOST,
    "RegistryService/DrainHost": OWNED_HOST,
    "RegistryService/UndrainHost": OWNED_HOST,
    # A daemon applies its own flags at start: the host may update itself.
    "RegistryService/UpdateHost": table(
        admin=ALLOW, provider=ALLOW, other_provider=HIDDEN, host=ALLOW
    ),
    "RegistryService/RevokeHost": ADMIN_ONLY,
    "RegistryService/RevokeProvider": ADMIN_ONLY,
    "RegistryService/ListOffers": SIGNED_IN,
    "LedgerService/GetBalance": OWN_TENANT,
    "LedgerService/ListEntries": OWN_TENANT,
    "LedgerService/Deposit": ADMIN_ONLY,
    "LedgerService/Payout": PROVIDER_TENANT,
    "LedgerService/RefundJob": ADMIN_ONLY,
    "LedgerService/GetUsage": OWN_TENANT,
    "LedgerService/CheckLedger": ADMIN_ONLY,
    "LedgerService/ListPayouts": PROVIDER_TENANT,
    "LedgerService/MarkPayoutPaid": ADMIN_ONLY,
    "LedgerService/FailPayout": ADMIN_ONLY,
    "LedgerService/SetSpendingLimit": OWN_TENANT,
    "LedgerService/GetBudget": OWN_TENANT,
    "AdminService/WhoAmI": table(ALLOW),
    "AdminService/CreateTenant": ADMIN_ONLY,
    "AdminService/ListTenants": ADMIN_ONLY,
    "AdminService/CreateApiKey": ADMIN_ONLY,
    "AdminService/ListApiKeys": ADMIN_ONLY,
    "AdminService/RevokeApiKey": ADMIN_ONLY,
    # Self-service provider onboarding is off by default: only admins mint tokens.
    "AdminService/CreateRegistrationToken": ADMIN_ONLY,
    "AdminService/ListRegistrationTokens": PROVIDER_TENANT,
    "AdminService/RevokeRegistrationToken": table(
        admin=ALLOW, provider=ALLOW, other_provider=HIDDEN
    ),
    "AdminService/GetPricingPolicy": SIGNED_IN,
    "AdminService/SetPricingPolicy": ADMIN_ONLY,
    "AdminService/GetFleetStatus": ADMIN_ONLY,
    # The world's job has finished: past authorisation its owner and admins get
    # FAILED_PRECONDITION, another tenant NOT_FOUND.
    "TunnelService/Exec": OWNED_JOB,
    "TunnelService/PortForward": OWNED_JOB,
    # Only a host calls back; no tunnel waits under the made-up id: NOT_FOUND past the policy.
    "TunnelRelayService/Tunnel": table(host=HIDDEN),
}
PRICE = 2 * CREDIT


@dataclass
class World:
    plane: JobPlane
    keys: dict[str, str | None] = field(default_factory=dict)
    tenants: dict[str, str] = field(default_factory=dict)
    host: ScriptedHost | None = None
    job: str = ""  # the consumer's job with stored results
    other_job: str = ""  # the other consumer's job, also with results
    session: str = ""  # the consumer's interactive session (on no host: no B200 here)
    service: str = ""  # the consumer's service (no replica: it is deployed with 0)
    service_key: str = ""  # a caller key of that service, for RevokeServiceKey
    token_id: str = ""  # a registration token of the provider's
    spare_key_id: str = ""  # an API key of the other consumer's, for RevokeApiKey
    spare_host_id: str = ""  # a host of the provider's, for RevokeHost
    seen_details: list[str] = field(default_factory=list)


async def finish(host: ScriptedHost, manifest: list[types_pb2.ResultObject]) -> None:
    dispatch = await host.next_dispatch()
    for kind in (K.JOB_REPORT_KIND_STARTING, K.JOB_REPORT_KIND_RUNNING):
        await host.report(dispatch, kind)
    await host.report(dispatch, K.JOB_REPORT_KIND_UPLOADING, exit_code=0, run_time_ms=1000)
    await host.report(
        dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=1000, manifest=manifest
    )


async def job_with_results(
    world: World, key: str, body: bytes, stray: str = "", stray_logs: str = ""
) -> str:
    """A job of the key's tenant run to success, its output and stdout stored; `stray` and
    `stray_logs`: keys outside its prefix that the (hostile) daemon lists in the manifest as
    an output and as the job's stdout."""
    plane, host = world.plane, world.host
    assert host is not None
    spec = types_pb2.JobSpec(
        image="gpuplane-test/busybox:1",
        gpu_count=1,
        max_duration_seconds=600,
        max_price_per_gpu_hour_micro_credits=PRICE,
    )
    reply = await plane.jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(spec=spec), metadata=plane.auth(key)
    )
    job_id = reply.job.job_id
    output = f"jobs/{job_id}/1/output/result.txt"
    await plane.plane.store.put_bytes(output, body)
    manifest = [types_pb2.ResultObject(key=output, path="output/result.txt", size_bytes=len(body))]
    if stray:
        manifest.append(types_pb2.ResultObject(key=stray, path="output/stolen", size_bytes=1))
    if stray_logs:
        manifest.append(types_pb2.ResultObject(key=stray_logs, path="logs/stdout", size_bytes=1))
    else:
        stdout = f"jobs/{job_id}/1/logs/stdout"
        await plane.plane.store.put_bytes(stdout, b"logs: " + body)
        manifest.append(types_pb2.ResultObject(key=stdout, path="logs/stdout", size_bytes=1))
    await finish(host, manifest)
    for _ in range(400):
        got = await plane.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=plane.auth())
        if got.job.state == types_pb2.JOB_STATE_SUCCEEDED:
            return job_id
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not succeed: {got.job.state_reason}")


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, nats_server: Any, s3_server: Any
) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("authz") / "cp"
    async with job_plane(data_dir, nats_server.url, s3_server, configure=with_dashboard) as plane:
        w = World(plane)
        admin = plane.admin
        provider_key = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant_id=plane.provider_tenant, role=types_pb2.ROLE_PROVIDER
            ),
            metadata=plane.auth(),
        )
        other_consumer, other_key = await new_tenant(plane, "other", types_pb2.ROLE_CONSUMER)
        other_provider, other_provider_key = await new_tenant(
            plane, "other-provider", types_pb2.ROLE_PROVIDER
        )
        await plane.deposit(other_consumer, 100, "other-initial")
        revoked = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                tenant_id=plane.consumer_tenant, role=types_pb2.ROLE_CONSUMER
            ),
            metadata=plane.auth(),
        )
        await admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=revoked.key.key_id), metadata=plane.auth()
        )
        spare = await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id=other_consumer, role=types_pb2.ROLE_CONSUMER),
            metadata=plane.auth(),
        )
        w.spare_key_id = spare.key.key_id
        token = await plane.token()
        w.host = ScriptedHost(plane.channel, plane.nats_url, token, gpus=2, price=PRICE)
        await w.host.start()
        # Dearer than any job here may pay: the scheduler never places work on it (it
        # disconnects at once, and is only there for RevokeHost).
        spare_host = ScriptedHost(plane.channel, plane.nats_url, token, gpus=1, price=2 * PRICE)
        await spare_host.start()
        await spare_host.close()
        w.spare_host_id = spare_host.host_id
        listed = await admin.ListRegistrationTokens(
            admin_pb2.ListRegistrationTokensRequest(provider_tenant_id=plane.provider_tenant),
            metadata=plane.auth(),
        )
        w.token_id = listed.tokens[0].token_id
        w.keys = {
            "admin": plane.admin_key,
            "consumer": plane.consumer_key,
            "other_consumer": other_key,
            "provider": provider_key.secret,
            "other_provider": other_provider_key,
            "host": w.host.credential,
            "no_key": None,
            "revoked": revoked.secret,
        }
        w.tenants = {
            "consumer": plane.consumer_tenant,
            "other_consumer": other_consumer,
            "provider": plane.provider_tenant,
            "other_provider": other_provider,
        }
        summary.record("authorisation matrix", jobs_run=2)
        w.other_job = await job_with_results(w, other_key, b"the other tenant's secret output")
        w.job = await job_with_results(
            w,
            plane.consumer_key,
            b"consumer output",
            stray=f"jobs/{w.other_job}/1/output/result.txt",
            stray_logs=f"jobs/{w.other_job}/1/logs/stdout",
        )
        await upload_input(plane, plane.consumer_key, INPUT_KEY, b"input")
        created = await sessions_pb2_grpc.SessionServiceStub(plane.channel).CreateSession(
            session_request(), metadata=plane.auth(plane.consumer_key)
        )
        w.session = created.session.session_id
        deployed = await services_pb2_grpc.ServiceServiceStub(plane.channel).DeployService(
            service_request("authz"), metadata=plane.auth(plane.consumer_key)
        )
        w.service = deployed.service.service_id
        w.service_key = await service_key(plane, w.service)
        try:
            yield w
        finally:
            await w.host.close()


async def upload_input(plane: JobPlane, key: str, input_key: str, data: bytes) -> None:
    """Puts `data` in the input area of the holder of `key` through DataService."""
    stub = data_pb2_grpc.DataServiceStub(plane.channel)
    upload = await stub.CreateUpload(
        data_pb2.CreateUploadRequest(key=input_key, size_bytes=len(data)), metadata=plane.auth(key)
    )
    request = urllib.request.Request(upload.url, data=data, method="PUT")
    await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=10).close())
    await stub.CompleteUpload(
        data_pb2.CompleteUploadRequest(key=input_key), metadata=plane.auth(key)
    )


def session_request() -> sessions_pb2.CreateSessionRequest:
    spec = types_pb2.JobSpec(image="gpuplane-test/busybox:1", gpu_count=1, gpu_models=["B200"])
    return sessions_pb2.CreateSessionRequest(spec=spec, duration_seconds=60)


def service_request(name: str) -> services_pb2.DeployServiceRequest:
    spec = types_pb2.JobSpec(image="gpuplane-test/busybox:1", gpu_count=1, gpu_models=["B200"])
    return services_pb2.DeployServiceRequest(name=name, spec=spec, port=8080, replicas=0)


async def service_key(plane: JobPlane, service: str) -> str:
    """A caller key of the consumer's `service` (its id)."""
    created = await services_pb2_grpc.ServiceServiceStub(plane.channel).CreateServiceKey(
        services_pb2.CreateServiceKeyRequest(service=service, description="authz"),
        metadata=plane.auth(plane.consumer_key),
    )
    return str(created.key.key_id)


def request_for(world: World, method: str) -> Message:
    """A well-formed request of `method` aimed at the consumer's or the provider's things."""
    t = world.tenants
    host_id = world.host.host_id if world.host else ""
    spec = types_pb2.JobSpec(image="gpuplane-test/busybox:1", max_duration_seconds=60, gpu_count=1)
    requests: dict[str, Message] = {
        "JobService/SubmitJob": jobs_pb2.SubmitJobRequest(spec=spec, dry_run=True),
        "JobService/GetJob": jobs_pb2.GetJobRequest(job_id=world.job),
        "JobService/ListJobs": jobs_pb2.ListJobsRequest(tenant_id=t["consumer"]),
        "JobService/CancelJob": jobs_pb2.CancelJobRequest(job_id=world.job, reason="authz"),
        "JobService/WatchJob": jobs_pb2.WatchJobRequest(job_id=world.job),
        "JobService/StreamLogs": jobs_pb2.StreamLogsRequest(job_id=world.job),
        "JobService/GetResults": jobs_pb2.GetResultsRequest(job_id=world.job),
        "JobService/GetJobEfficiency": jobs_pb2.GetJobEfficiencyRequest(job_id=world.job),
        "SessionService/CreateSession": session_request(),
        "SessionService/GetSession": sessions_pb2.GetSessionRequest(session_id=world.session),
        "SessionService/ListSessions": sessions_pb2.ListSessionsRequest(tenant_id=t["consumer"]),
        "SessionService/ExtendSession": sessions_pb2.ExtendSessionRequest(
            session_id=world.session, duration_seconds=60
        ),
        "SessionService/FinishSession": sessions_pb2.FinishSessionRequest(session_id=world.session),
        "SessionService/DestroySession": sessions_pb2.DestroySessionRequest(
            session_id=world.session
        ),
        # A new name each time: every caller (and the browser pass again) deploys its own.
        "ServiceService/DeployService": service_request(f"authz-{secrets.token_hex(4)}"),
        "ServiceService/GetService": services_pb2.GetServiceRequest(service=world.service),
        "ServiceService/ListServices": services_pb2.ListServicesRequest(tenant_id=t["consumer"]),
        "ServiceService/ScaleService": services_pb2.ScaleServiceRequest(
            service=world.service, replicas=0
        ),
        "ServiceService/StopService": services_pb2.StopServiceRequest(service=world.service),
        "ServiceService/StartService": services_pb2.StartServiceRequest(service=world.service),
        "ServiceService/DeleteService": services_pb2.DeleteServiceRequest(service=world.service),
        "ServiceService/CreateServiceKey": services_pb2.CreateServiceKeyRequest(
            service=world.service, description="authz"
        ),
        "ServiceService/ListServiceKeys": services_pb2.ListServiceKeysRequest(
            service=world.service
        ),
        # Revoking a revoked key again answers it as it is: every caller may try the same key.
        "ServiceService/RevokeServiceKey": services_pb2.RevokeServiceKeyRequest(
            service=world.service, key_id=world.service_key
        ),
        "DataService/CreateUpload": data_pb2.CreateUploadRequest(key=INPUT_KEY, size_bytes=5),
        "DataService/CompleteUpload": data_pb2.CompleteUploadRequest(key=INPUT_KEY),
        "DataService/AbortUpload": data_pb2.AbortUploadRequest(key=INPUT_KEY, upload_id="gone"),
        "DataService/ListInputs": data_pb2.ListInputsRequest(),
        "DataService/DeleteInput": data_pb2.DeleteInputRequest(key=INPUT_KEY),
        "RegistryService/Connect": registry_pb2.DaemonMessage(
            hello=registry_pb2.DaemonHello(host_id=host_id)
        ),
        "RegistryService/ListHosts": registry_pb2.ListHostsRequest(
            provider_tenant_id=t["provider"]
        ),
        "RegistryService/GetHost": registry_pb2.GetHostRequest(host_id=host_id),
        "RegistryService/DrainHost": registry_pb2.DrainHostRequest(host_id=host_id),
        "RegistryService/UndrainHost": registry_pb2.UndrainHostRequest(host_id=host_id),
        "RegistryService/UpdateHost": registry_pb2.UpdateHostRequest(
            host_id=host_id, location="authz"
        ),
        "RegistryService/RevokeHost": registry_pb2.RevokeHostRequest(
            host_id=world.spare_host_id, reason="authz"
        ),
        # The other provider's (it has no host): revoking it leaves the world's hosts alone.
        "RegistryService/RevokeProvider": registry_pb2.RevokeProviderRequest(
            provider_tenant_id=t["other_provider"], reason="authz"
        ),
        "RegistryService/ListOffers": registry_pb2.ListOffersRequest(),
        "LedgerService/GetBalance": ledger_pb2.GetBalanceRequest(tenant_id=t["consumer"]),
        "LedgerService/ListEntries": ledger_pb2.ListEntriesRequest(tenant_id=t["consumer"]),
        "LedgerService/Deposit": ledger_pb2.DepositRequest(
            tenant_id=t["consumer"], amount_micro_credits=1, idempotency_key="authz-deposit"
        ),
        "LedgerService/Payout": ledger_pb2.PayoutRequest(
            tenant_id=t["provider"],
            amount_micro_credits=1,
            destination="iban:authz",
            idempotency_key="authz-payout",
        ),
        "LedgerService/RefundJob": ledger_pb2.RefundJobRequest(
            job_id=world.job, amount_micro_credits=1, reason="authz", idempotency_key="authz-r"
        ),
        "LedgerService/GetUsage": ledger_pb2.GetUsageRequest(tenant_id=t["consumer"]),
        "LedgerService/CheckLedger": ledger_pb2.CheckLedgerRequest(),
        "LedgerService/ListPayouts": ledger_pb2.ListPayoutsRequest(tenant_id=t["provider"]),
        # No payout id: past authorisation an admin gets INVALID_ARGUMENT, and no payout moves.
        "LedgerService/MarkPayoutPaid": ledger_pb2.MarkPayoutPaidRequest(),
        "LedgerService/FailPayout": ledger_pb2.FailPayoutRequest(reason="authz"),
        # 0: no limit, so the consumer's later submits are not refused by it.
        "LedgerService/SetSpendingLimit": ledger_pb2.SetSpendingLimitRequest(
            tenant_id=t["consumer"], monthly_limit_micro_credits=0
        ),
        "LedgerService/GetBudget": ledger_pb2.GetBudgetRequest(tenant_id=t["consumer"]),
        "AdminService/WhoAmI": admin_pb2.WhoAmIRequest(),
        "AdminService/CreateTenant": admin_pb2.CreateTenantRequest(
            name="authz-tenant", idempotency_key="authz-tenant"
        ),
        "AdminService/ListTenants": admin_pb2.ListTenantsRequest(),
        "AdminService/CreateApiKey": admin_pb2.CreateApiKeyRequest(
            tenant_id=t["consumer"], role=types_pb2.ROLE_CONSUMER, idempotency_key="authz-key"
        ),
        "AdminService/ListApiKeys": admin_pb2.ListApiKeysRequest(),
        "AdminService/RevokeApiKey": admin_pb2.RevokeApiKeyRequest(key_id=world.spare_key_id),
        "AdminService/CreateRegistrationToken": admin_pb2.CreateRegistrationTokenRequest(
            provider_tenant_id=t["provider"], idempotency_key="authz-token"
        ),
        "AdminService/ListRegistrationTokens": admin_pb2.ListRegistrationTokensRequest(
            provider_tenant_id=t["provider"]
        ),
        "AdminService/RevokeRegistrationToken": admin_pb2.RevokeRegistrationTokenRequest(
            token_id=world.token_id
        ),
        "AdminService/GetPricingPolicy": admin_pb2.GetPricingPolicyRequest(),
        "AdminService/SetPricingPolicy": admin_pb2.SetPricingPolicyRequest(),
        "AdminService/GetFleetStatus": admin_pb2.GetFleetStatusRequest(),
        "TunnelService/Exec": tunnels_pb2.ExecRequest(
            start=tunnels_pb2.ExecStart(job_id=world.job, command=["true"])
        ),
        "TunnelService/PortForward": tunnels_pb2.PortForwardRequest(
            start=tunnels_pb2.PortForwardStart(job_id=world.job, port=8080)
        ),
        "TunnelRelayService/Tunnel": tunnels_pb2.TunnelFrame(tunnel_id="no-such-tunnel"),
    }
    return requests[method]


def method_descriptor(method: str) -> Any:
    service, name = method.split("/")
    for module in SERVICE_MODULES:
        if service in module.DESCRIPTOR.services_by_name:
            return module.DESCRIPTOR.services_by_name[service].methods_by_name[name]
    raise KeyError(method)


async def outcome(world: World, method: str, key: str | None) -> tuple[str, str]:
    """(what the caller got as a matrix cell, the status details)."""
    descriptor = method_descriptor(method)
    request = request_for(world, method)
    output = message_factory.GetMessageClass(descriptor.output_type)
    path = f"/gpuplane.v1.{method}"
    channel = world.plane.channel
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    kw: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": output.FromString,
    }
    try:
        if descriptor.client_streaming:
            call = channel.stream_stream(path, **kw)(iter([request]), metadata=metadata)
            try:
                await asyncio.wait_for(call.read(), 5)
            finally:
                call.cancel()
        elif descriptor.server_streaming:
            stream = channel.unary_stream(path, **kw)(request, metadata=metadata, timeout=5)
            async for _ in stream:
                break
            stream.cancel()
        else:
            await channel.unary_unary(path, **kw)(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        code, details = error.code(), error.details() or ""
        world.seen_details.append(details)
        if code in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.NOT_FOUND,
        ):
            return code.name, details
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            f"{method} as {key and key[:8]}: {code.name} {details}"
        )
        return ALLOW, f"{code.name}: {details}"  # got past authorisation
    return ALLOW, "OK"


def test_table_covers_every_rpc_and_the_policy() -> None:
    """The intended table, the policy module and the proto agree on what exists."""
    rpcs = {
        f"{service.name}/{m.name}"
        for module in SERVICE_MODULES
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    public = {m.removeprefix("/gpuplane.v1.") for m in PUBLIC_METHODS}
    assert rpcs - public == set(EXPECTED)
    assert {m.removeprefix("/gpuplane.v1.") for m in ALLOWED_ROLES} == set(EXPECTED)


# Mutating calls last, each caller in the same order, so that e.g. the admin's CancelJob
# runs after every read of the job (a cancelled, finished job still answers the reads).
ORDER = sorted(
    EXPECTED,
    key=lambda m: m.endswith(
        (
            "CancelJob",
            "ExtendSession",
            "FinishSession",
            "DestroySession",
            "DeleteService",
            "DeleteInput",
            "RevokeApiKey",
            "RevokeRegistrationToken",
            "RevokeHost",
            "RevokeProvider",
        )
    ),
)


@pytest.mark.parametrize("method", ORDER)
async def test_authorisation_matrix(world: World, method: str) -> None:
    expected = EXPECTED[method]
    got = {}
    for caller in CALLERS:
        cell, details = await outcome(world, method, world.keys[caller])
        got[caller] = cell
        if cell != expected[caller]:
            got[caller] += f" ({details})"
    summary.record(
        "authorisation matrix",
        f"{len(EXPECTED)} RPCs x {len(CALLERS)} callers against the intended table",
        requests_tried=len(CALLERS),
    )
    wrong = {c: g for c, g in got.items() if not g.startswith(expected[c])}
    assert not wrong, f"{method}: expected {expected}, got {wrong}"


async def test_register_host_needs_a_valid_token(world: World) -> None:
    plane = world.plane
    for token in ("", "rt_not-a-token", "gpk_" + "x" * 43):
        host = ScriptedHost(plane.channel, plane.nats_url, token, gpus=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await host.register()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # An API key is not a registration token, whoever's it is.
    host = ScriptedHost(plane.channel, plane.nats_url, plane.admin_key, gpus=1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await host.register()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    summary.record("authorisation matrix", requests_tried=4)


async def test_tenants_never_see_each_other(world: World) -> None:
    """The consumer's own reads return only its own jobs, entries and usage; the other
    tenant's job is NOT_FOUND to it through every JobService door."""
    plane = world.plane
    mine = plane.auth(plane.consumer_key)
    listed = await plane.jobs.ListJobs(jobs_pb2.ListJobsRequest(page_size=500), metadata=mine)
    assert {j.tenant_id for j in listed.jobs} == {plane.consumer_tenant}
    assert world.other_job not in {j.job_id for j in listed.jobs}
    entries = await plane.ledger.ListEntries(
        ledger_pb2.ListEntriesRequest(page_size=500), metadata=mine
    )
    assert world.other_job not in {e.job_id for e in entries.entries}
    assert {e.job_id for e in entries.entries} - {""} <= {j.job_id for j in listed.jobs}
    filtered = await plane.ledger.ListEntries(
        ledger_pb2.ListEntriesRequest(job_id=world.other_job), metadata=mine
    )
    assert list(filtered.entries) == []
    usage = await plane.ledger.GetUsage(
        ledger_pb2.GetUsageRequest(job_id=world.other_job), metadata=mine
    )
    assert list(usage.rows) == []
    assert usage.total_cost_micro_credits == 0
    own_usage = await plane.ledger.GetUsage(ledger_pb2.GetUsageRequest(), metadata=mine)
    assert world.other_job not in {r.job_id for r in own_usage.rows}
    balance = await plane.ledger.GetBalance(ledger_pb2.GetBalanceRequest(), metadata=mine)
    assert balance.balance.tenant_id == plane.consumer_tenant
    calls: list[Any] = [
        plane.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=world.other_job), metadata=mine),
        plane.jobs.GetResults(jobs_pb2.GetResultsRequest(job_id=world.other_job), metadata=mine),
        plane.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=world.other_job), metadata=mine),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for stream in (
        plane.jobs.StreamLogs(jobs_pb2.StreamLogsRequest(job_id=world.other_job), metadata=mine),
        plane.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=world.other_job), metadata=mine),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # The daemon's manifest named the other job's stdout as this job's: not read.
    own = plane.jobs.StreamLogs(jobs_pb2.StreamLogsRequest(job_id=world.job), metadata=mine)
    assert b"secret" not in b"".join([chunk.data async for chunk in own])
    theirs = plane.jobs.StreamLogs(
        jobs_pb2.StreamLogsRequest(job_id=world.other_job),
        metadata=plane.auth(world.keys["other_consumer"]),
    )
    assert b"".join([chunk.data async for chunk in theirs]) == (
        b"logs: the other tenant's secret output"
    )
    # The answers name nothing of the other tenant's.
    other = await plane.jobs.GetJob(
        jobs_pb2.GetJobRequest(job_id=world.other_job), metadata=plane.auth()
    )
    leaked = [d for d in world.seen_details if world.tenants["other_consumer"] in d]
    assert not leaked
    assert other.job.tenant_id == world.tenants["other_consumer"]
    summary.record(
        "tenant isolation", "jobs, logs, results, entries, usage, balance", requests_tried=12
    )


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:  # noqa: S310 - our S3 server
            return int(reply.status), bytes(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, b""


async def test_result_urls_are_scoped_to_the_job_and_expire(world: World) -> None:
    plane = world.plane
    reply = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=world.job, url_ttl_seconds=120),
        metadata=plane.auth(plane.consumer_key),
    )
    prefix = f"jobs/{world.job}/{reply.attempt}/"
    # The daemon's manifest also named the other job's output: that is not presigned.
    assert [o.key for o in reply.objects] == [f"{prefix}output/result.txt"]
    for obj in reply.objects:
        parsed = urllib.parse.urlparse(obj.url)
        assert urllib.parse.unquote(parsed.path).endswith(f"/{obj.key}")
        query = urllib.parse.parse_qs(parsed.query)
        assert query["X-Amz-Expires"] == ["120"]
        assert await asyncio.to_thread(fetch, obj.url) == (200, b"consumer output")
        # The signature covers the path: the same URL aimed at another object is refused.
        other = obj.url.replace(world.job, world.other_job)
        status, _ = await asyncio.to_thread(fetch, other)
        assert status == 403
    short = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=world.job, url_ttl_seconds=1),
        metadata=plane.auth(plane.consumer_key),
    )
    await asyncio.sleep(2.2)
    status, _ = await asyncio.to_thread(fetch, short.objects[0].url)
    assert status == 403
    too_long = jobs_pb2.GetResultsRequest(job_id=world.job, url_ttl_seconds=8 * 24 * 3600)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plane.jobs.GetResults(too_long, metadata=plane.auth(plane.consumer_key))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    summary.record("presigned URLs", "scoped to the attempt prefix, expire", requests_tried=7)


def with_dashboard(options: dict[str, Any]) -> None:
    options["dashboard_address"] = "127.0.0.1:0"  # the browser path: gRPC-Web


@pytest.fixture(scope="module")
async def browsers(world: World) -> AsyncIterator[dict[str, Browser]]:
    """Each caller's browser, logged in with its key, after the gRPC matrix ran. A host
    credential is not an API key: it cannot log in, so the host's browser has no session;
    "revoked" logs in with a key revoked after the login."""
    plane = world.plane
    key = await plane.admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            tenant_id=plane.consumer_tenant, role=types_pb2.ROLE_CONSUMER
        ),
        metadata=plane.auth(),
    )
    keys = {**world.keys, "revoked": key.secret}
    async with logged_in(dashboard_url(plane), keys) as browsers:
        assert browsers["host"].logged_in is False
        await plane.admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(key_id=key.key.key_id), metadata=plane.auth()
        )
        # The gRPC matrix deleted the consumer's input: put back for the same answers.
        await upload_input(plane, plane.consumer_key, INPUT_KEY, b"input")
        # And deleted the consumer's service: deployed again (its name is free).
        deployed = await services_pb2_grpc.ServiceServiceStub(plane.channel).DeployService(
            service_request("authz"), metadata=plane.auth(plane.consumer_key)
        )
        world.service = deployed.service.service_id
        world.service_key = await service_key(plane, world.service)
        yield browsers


@pytest.mark.parametrize("method", ORDER)
async def test_authorisation_matrix_through_the_browser(
    world: World, browsers: dict[str, Browser], method: str
) -> None:
    """The same table through gRPC-Web with each caller's session cookie, but for what a
    browser cannot do: hold a host credential's session (UNAUTHENTICATED) or stream requests
    (UNIMPLEMENTED, whoever calls)."""
    expected = {**EXPECTED[method], "host": UNAUTH}
    if method_descriptor(method).client_streaming:
        expected = dict.fromkeys(CALLERS, "UNIMPLEMENTED")
    got = {}
    for caller in CALLERS:
        reply = await browsers[caller].call(method, request_for(world, method), first_only=True)
        got[caller] = browser_cell(reply, f"{method} as {caller}")
    summary.record(
        "authorisation matrix",
        f"{len(EXPECTED)} RPCs x {len(CALLERS)} callers, through gRPC and gRPC-Web",
        requests_tried=len(CALLERS),
    )
    wrong = {c: g for c, g in got.items() if not g.startswith(expected[c])}
    assert not wrong, f"{method} (gRPC-Web): expected {expected}, got {wrong}"
