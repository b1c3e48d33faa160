"""Services' caller keys (ServiceService.Create/List/RevokeServiceKey) and how the gateway
takes them and API keys, without a database read per request (SQLite and PostgreSQL): bad
input names its field; the secret is shown once and stored hashed (an idempotent retry
returns the same key without it); a caller key reaches its
own service only (another of the owner's services, or another tenant's, is 404 like a missing
one); a revoked caller key, and a revoked API key, are 401 at once (within BOUND)."""

from __future__ import annotations

import time

import grpc
import pytest
from gpuplane.v1 import admin_pb2, services_pb2, types_pb2
from sqlalchemy import select

from controlplane.auth.service import hash_secret
from controlplane.services.models import ServiceKey
from devstack.factories import new_key, new_tenant
from tests.controlplane.test_gateway_routes import (
    BOUND,
    deploy,
    fetch,
    gateway_base,
    route_of,
    services_stub,
    within,
)
from tests.harness import JobPlane

SV = services_pb2
NO_REPLICA = (503, "service unavailable: no replica is ready")
pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.databases("sqlite", "postgresql"),
    pytest.mark.plane(gateway_address="127.0.0.1:0", gateway_resync_ms=60_000),
]


def keyed(plane: JobPlane, name: str) -> bool:
    route = route_of(plane, name)
    return route is not None and bool(route.keys)


async def refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return str(caught.value.details())


async def test_caller_keys_reach_their_service_only_and_stop_when_revoked(
    plane: JobPlane,
) -> None:
    base = await gateway_base(plane)
    stub, auth = services_stub(plane), plane.auth(plane.consumer_key)
    await deploy(plane, "web", plane.consumer_key, replicas=0)
    await deploy(plane, "api", plane.consumer_key, replicas=0)
    other_tenant, other_key = await new_tenant(plane, "other", types_pb2.ROLE_CONSUMER)
    shop = await deploy(plane, "shop", other_key, replicas=0)

    bad = SV.CreateServiceKeyRequest(service="web", description="x" * 501)
    assert "description" in await refused(
        stub.CreateServiceKey(bad, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    missing = SV.CreateServiceKeyRequest(service="")
    assert "service" in await refused(
        stub.CreateServiceKey(missing, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    theirs = SV.CreateServiceKeyRequest(service="shop")
    assert "service" in await refused(
        stub.CreateServiceKey(theirs, metadata=auth), grpc.StatusCode.NOT_FOUND
    )
    no_id = SV.RevokeServiceKeyRequest(service="web")
    assert "key_id" in await refused(
        stub.RevokeServiceKey(no_id, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )
    unknown = SV.RevokeServiceKeyRequest(service="web", key_id="skey_nope")
    assert "key_id" in await refused(
        stub.RevokeServiceKey(unknown, metadata=auth), grpc.StatusCode.NOT_FOUND
    )

    long_key = SV.CreateServiceKeyRequest(service="web", idempotency_key="k" * 201)
    assert "idempotency_key" in await refused(
        stub.CreateServiceKey(long_key, metadata=auth), grpc.StatusCode.INVALID_ARGUMENT
    )

    once = SV.CreateServiceKeyRequest(service="web", description="partner", idempotency_key="p1")
    made = await stub.CreateServiceKey(once, metadata=auth)
    secret, key_id = made.secret, made.key.key_id
    replay = await stub.CreateServiceKey(once, metadata=auth)
    assert (replay.key.key_id, replay.secret) == (key_id, ""), "the same key, its secret not again"
    changed = SV.CreateServiceKeyRequest(service="web", description="other", idempotency_key="p1")
    assert "idempotency_key" in await refused(
        stub.CreateServiceKey(changed, metadata=auth), grpc.StatusCode.ALREADY_EXISTS
    )
    assert secret.startswith("gsk_")
    assert made.key.prefix == secret[:10]
    db = plane.plane.db
    assert db is not None
    async with db.read() as session:
        stored = await session.scalar(select(ServiceKey).where(ServiceKey.id == key_id))
    assert stored is not None
    assert stored.secret_hash == hash_secret(secret), "stored hashed, not as given"
    listed = await stub.ListServiceKeys(SV.ListServiceKeysRequest(service="web"), metadata=auth)
    assert [(k.key_id, k.description) for k in listed.keys] == [(key_id, "partner")]
    assert secret not in str(listed)

    await within(lambda: keyed(plane, "web"))
    assert await fetch(base, "web", secret) == NO_REPLICA, "the key reaches its service"
    assert (await fetch(base, "api", secret))[0] == 404, "not the owner's other services"
    assert (await fetch(base, "shop", secret))[0] == 404, "nor another tenant's"
    assert (await fetch(base, "web", other_key))[0] == 404, "another tenant's API key: 404"
    assert (await fetch(base, "web", "gsk_" + "x" * 43))[0] == 401
    assert (await fetch(base, "web", ""))[0] == 401
    assert await fetch(base, "api", plane.consumer_key) == NO_REPLICA, "the owner's key: all"
    web_id, shop_id = made.key.service_id, shop.service_id
    services = plane.plane.services
    assert services is not None
    gateway = services.gateway
    assert gateway is not None
    await within(lambda: gateway.routes.get(shop_id) is not None)
    assert await fetch(base, web_id, secret) == NO_REPLICA, "by id too"
    assert await fetch(base, web_id, plane.consumer_key) == NO_REPLICA
    assert (await fetch(base, shop_id, plane.consumer_key))[0] == 404, "not another's by id"
    assert await fetch(base, shop_id, plane.admin_key) == NO_REPLICA, "an admin's: any by id"
    assert other_tenant

    revoked = await stub.RevokeServiceKey(
        SV.RevokeServiceKeyRequest(service="web", key_id=key_id), metadata=auth
    )
    assert revoked.key.HasField("revoked_at")
    started = time.monotonic()
    while (await fetch(base, "web", secret))[0] != 401:
        assert time.monotonic() - started < BOUND, "a revoked key stops at once"
    listed = await stub.ListServiceKeys(SV.ListServiceKeysRequest(service="web"), metadata=auth)
    assert list(listed.keys) == []
    every = SV.ListServiceKeysRequest(service="web", include_revoked=True)
    assert [k.key_id for k in (await stub.ListServiceKeys(every, metadata=auth)).keys] == [key_id]
    again = await stub.RevokeServiceKey(
        SV.RevokeServiceKeyRequest(service="web", key_id=key_id), metadata=auth
    )
    assert again.key.revoked_at == revoked.key.revoked_at, "revoking again changes nothing"


async def test_a_revoked_api_key_stops_at_the_gateway_at_once(plane: JobPlane) -> None:
    base = await gateway_base(plane)
    key = await new_key(plane, plane.consumer_tenant, types_pb2.ROLE_CONSUMER)
    await deploy(plane, "web", key, replicas=0)
    await within(lambda: route_of(plane, "web") is not None)
    assert await fetch(base, "web", key) == NO_REPLICA  # now cached
    admin = plane.admin
    keys = await admin.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id=plane.consumer_tenant),
        metadata=plane.auth(plane.admin_key),
    )
    key_id = next(k.key_id for k in keys.keys if key.startswith(k.prefix))
    await admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=plane.auth(plane.admin_key)
    )
    # This replica drops it from its cache at once; another would within the cache's ttl.
    assert (await fetch(base, "web", key))[0] == 401
