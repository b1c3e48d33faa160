"""Factories for tests and benchmarks: tenants, keys, registration tokens, hosts and jobs made
through a running control plane's public gRPC API, as any client would make them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import grpc
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

from devstack.images import TEST_IMAGE

CREDIT = 1_000_000
GIB = 1 << 30

Metadata = tuple[tuple[str, str], ...]


class Reachable(Protocol):
    """A control plane as a client sees it: a channel to it and its admin key."""

    @property
    def channel(self) -> grpc.aio.Channel: ...

    @property
    def admin_key(self) -> str: ...


@dataclass(frozen=True)
class Client:
    """The plainest Reachable: what a benchmark holds after starting a control plane."""

    channel: grpc.aio.Channel
    admin_key: str


class Tenant(NamedTuple):
    """A tenant and the secret of an API key of the role asked for; unpacks as a pair."""

    tenant_id: str
    key: str


def bearer(key: str) -> Metadata:
    """gRPC metadata authenticating as `key` (an API key or a host credential)."""
    return (("authorization", f"Bearer {key}"),)


async def new_key(
    plane: Reachable, tenant_id: str, role: types_pb2.Role.ValueType = types_pb2.ROLE_CONSUMER
) -> str:
    """A new API key of `role` for the tenant; returns its secret."""
    reply = await admin_pb2_grpc.AdminServiceStub(plane.channel).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(tenant_id=tenant_id, role=role),
        metadata=bearer(plane.admin_key),
    )
    return str(reply.secret)


async def new_tenant(
    plane: Reachable,
    name: str,
    role: types_pb2.Role.ValueType = types_pb2.ROLE_CONSUMER,
    *,
    micro_credits: int = 0,
) -> Tenant:
    """A new tenant with an API key of `role`, funded with `micro_credits` when non-zero."""
    reply = await admin_pb2_grpc.AdminServiceStub(plane.channel).CreateTenant(
        admin_pb2.CreateTenantRequest(name=name), metadata=bearer(plane.admin_key)
    )
    tenant_id = str(reply.tenant.tenant_id)
    key = await new_key(plane, tenant_id, role)
    if micro_credits:
        await deposit(plane, tenant_id, micro_credits, f"fund-{tenant_id}")
    return Tenant(tenant_id, key)


async def deposit(plane: Reachable, tenant_id: str, micro_credits: int, key: str) -> None:
    """An admin deposit; `key` is its idempotency key."""
    await ledger_pb2_grpc.LedgerServiceStub(plane.channel).Deposit(
        ledger_pb2.DepositRequest(
            tenant_id=tenant_id, amount_micro_credits=micro_credits, idempotency_key=key
        ),
        metadata=bearer(plane.admin_key),
    )


async def new_token(
    plane: Reachable, provider_tenant_id: str, **fields: Any
) -> admin_pb2.CreateRegistrationTokenResponse:
    """A registration token for the provider (`fields`: label, ttl_seconds, max_uses, ...);
    the reply holds `.token.token_id` and the `.secret` a daemon registers with."""
    return await admin_pb2_grpc.AdminServiceStub(plane.channel).CreateRegistrationToken(
        admin_pb2.CreateRegistrationTokenRequest(provider_tenant_id=provider_tenant_id, **fields),
        metadata=bearer(plane.admin_key),
    )


def new_gpus(
    count: int,
    model: str = "NVIDIA A100-SXM4-80GB",
    *,
    vram_gib: int = 80,
    prefix: str = "",
    compute_capability: str = "",
) -> list[types_pb2.Gpu]:
    """`count` GPUs of one model, with UUIDs unique to `prefix` (a fresh one by default);
    the compute capability is the model's (9.0 for an H100, else 8.0) unless given."""
    prefix = prefix or uuid.uuid4().hex[:8]
    capability = compute_capability or ("9.0" if "H100" in model else "8.0")
    return [
        types_pb2.Gpu(
            uuid=f"GPU-{prefix}-{i}",
            index=i,
            name=model,
            memory_total_bytes=vram_gib * GIB,
            compute_capability=capability,
        )
        for i in range(count)
    ]


async def new_host(
    channel: grpc.aio.Channel, token: str, **fields: Any
) -> registry_pb2.RegisterHostResponse:
    """Registers a machine with `token`, as a daemon does (the token is the only credential);
    `fields` override the defaults: a fresh machine id, 4 simulated A100s at 2 credits per
    GPU-hour."""
    machine_id = str(fields.pop("machine_id", "") or uuid.uuid4().hex)
    request: dict[str, Any] = {
        "registration_token": token,
        "machine_id": machine_id,
        "hostname": f"host-{machine_id[:6]}",
        "simulated": True,
        "price_per_gpu_hour_micro_credits": 2 * CREDIT,
        "location": "test-lab",
        **fields,
    }
    if "gpus" not in request:
        request["gpus"] = new_gpus(4, prefix=machine_id[:8])
    return await registry_pb2_grpc.RegistryServiceStub(channel).RegisterHost(
        registry_pb2.RegisterHostRequest(**request)
    )


async def say_hello(channel: grpc.aio.Channel, host: registry_pb2.RegisterHostResponse) -> None:
    """Opens the host's Connect stream, says hello as its daemon does first, waits for the
    acknowledgement and hangs up: a REGISTERED host is admitted (ONLINE) and stays so until
    its liveness timeout."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    call = stub.Connect(metadata=bearer(host.host_credential))  # type: ignore[call-arg]
    try:
        hello = registry_pb2.DaemonHello(host_id=host.host_id)
        await call.write(registry_pb2.DaemonMessage(hello=hello))
        ack = await call.read()
        if ack is grpc.aio.EOF or ack.WhichOneof("msg") != "hello_ack":  # type: ignore[attr-defined]
            raise RuntimeError(f"host {host.host_id}: no hello_ack on Connect ({ack})")
    finally:
        call.cancel()


async def new_online_host(
    channel: grpc.aio.Channel, token: str, **fields: Any
) -> registry_pb2.RegisterHostResponse:
    """new_host, then its daemon's hello (say_hello): a host that is offered at once."""
    host = await new_host(channel, token, **fields)
    await say_hello(channel, host)
    return host


def job_spec(**spec: Any) -> types_pb2.JobSpec:
    """A JobSpec with the tests' defaults (the busybox test image, 10 minutes, up to 2 credits
    per GPU-hour) under the fields given."""
    spec.setdefault("image", TEST_IMAGE)
    spec.setdefault("max_duration_seconds", 600)
    spec.setdefault("max_price_per_gpu_hour_micro_credits", 2 * CREDIT)
    return types_pb2.JobSpec(**spec)


async def new_job(plane: Reachable, key: str, **spec: Any) -> types_pb2.Job:
    """Submits a job as the holder of `key`; `spec` as for job_spec()."""
    reply = await jobs_pb2_grpc.JobServiceStub(plane.channel).SubmitJob(
        jobs_pb2.SubmitJobRequest(spec=job_spec(**spec)), metadata=bearer(key)
    )
    return reply.job
