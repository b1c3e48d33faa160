"""What `gpuplane up` sets up and tells: demo tenants and keys, the env file, the banner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from gpuplane.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from grpc import aio

if TYPE_CHECKING:
    from gpuplane_cli.up import Stack

CONSUMER_TENANT = "demo-consumer"
PROVIDER_TENANT = "demo-provider"


@dataclass(frozen=True)
class DemoKeys:
    consumer_tenant: str
    consumer_key: str
    provider_tenant: str
    provider_key: str


async def _key_works(
    admin: admin_pb2_grpc.AdminServiceAsyncStub,
    key: str,
    tenant: str,
    role: types_pb2.Role.ValueType,
) -> bool:
    if not key:
        return False
    try:
        who = await admin.WhoAmI(
            admin_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=10
        )
    except grpc.RpcError:
        return False
    return who.tenant_id == tenant and who.role == role


async def _tenant_key(
    admin: admin_pb2_grpc.AdminServiceAsyncStub,
    auth: tuple[tuple[str, str], ...],
    name: str,
    role: types_pb2.Role.ValueType,
    known_key: str,
) -> tuple[str, str]:
    """The tenant `name` (created once, by idempotency key) and a working key of `role` for
    it: `known_key` (from an earlier env file) when it still works, else a new one."""
    tenant = await admin.CreateTenant(
        admin_pb2.CreateTenantRequest(name=name, idempotency_key=f"gpuplane-up/tenant/{name}"),
        metadata=auth,
        timeout=10,
    )
    tenant_id = tenant.tenant.tenant_id
    if await _key_works(admin, known_key, tenant_id, role):
        return tenant_id, known_key
    created = await admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            tenant_id=tenant_id, role=role, description=f"gpuplane up: {name} key"
        ),
        metadata=auth,
        timeout=10,
    )
    return tenant_id, created.secret


async def ensure_demo_keys(addr: str, admin_key: str, known: dict[str, str]) -> DemoKeys:
    """A consumer and a provider tenant with one key each, reusing what still works."""
    auth = (("authorization", f"Bearer {admin_key}"),)
    async with aio.insecure_channel(addr) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        consumer, consumer_key = await _tenant_key(
            admin, auth, CONSUMER_TENANT, types_pb2.ROLE_CONSUMER, known.get("GPUPLANE_API_KEY", "")
        )
        provider, provider_key = await _tenant_key(
            admin,
            auth,
            PROVIDER_TENANT,
            types_pb2.ROLE_PROVIDER,
            known.get("GPUPLANE_PROVIDER_API_KEY", ""),
        )
    return DemoKeys(consumer, consumer_key, provider, provider_key)


def env_values(addr: str, admin_key: str, keys: DemoKeys) -> dict[str, str]:
    return {
        "GPUPLANE_ADDR": addr,
        "GPUPLANE_API_KEY": keys.consumer_key,
        "GPUPLANE_ADMIN_API_KEY": admin_key,
        "GPUPLANE_PROVIDER_API_KEY": keys.provider_key,
        "GPUPLANE_ALLOW_SIMULATED": "1",
        "GPUPLANE_PLAINTEXT": "1",  # the embedded stack serves loopback without TLS
    }


def banner(stack: Stack, keys: DemoKeys, env_path: Path, ready_seconds: float) -> str:
    from devstack import TEST_IMAGE

    assert stack.plane is not None
    assert stack.nats is not None
    assert stack.s3 is not None
    plane = stack.plane
    metrics = f"http://127.0.0.1:{plane.metrics_port}/metrics" if plane.metrics_port else "(off)"
    addr = stack.addr
    rows = [
        ("gRPC API", f"{addr}  (control plane, SQLite in {stack.data_dir / 'gpuplane.db'})"),
        ("dashboard", f"http://127.0.0.1:{plane.dashboard_port}/  (log in with an API key)"),
        ("metrics", metrics),
        ("NATS", f"{stack.nats.url}  (JetStream; monitor {stack.nats.monitor_url})"),
        ("S3", f"{stack.s3.url}  (bucket gpuplane, access key {stack.s3.access_key})"),
        ("logs", str(stack.data_dir / "logs")),
        ("env file", f"{env_path}  (addr, consumer/admin/provider keys)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"gpuplane is up (ready in {ready_seconds:.1f}s)"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines += [
        "",
        "Use it from another shell:",
        f"  set -a; . {env_path}; set +a",
        "  gpuplane whoami",
        "  gpuplane offers",
        "  gpuplane ledger balance",
        '  gpuplane --api-key "$GPUPLANE_ADMIN_API_KEY" ledger deposit 100 '
        f"--tenant {keys.consumer_tenant}",
        f"  gpuplane jobs submit --image {TEST_IMAGE} --gpus 1 --wait -- "
        "sh -c 'echo hello > /output/hello.txt; echo done'",
        '  grpcurl -plaintext -H "authorization: Bearer $GPUPLANE_API_KEY" '
        f"{addr} gpuplane.v1.AdminService/WhoAmI",
    ]
    return "\n".join(lines)
