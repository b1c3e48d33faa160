"""The cost of admitting a call: a verified key is cached, yet a revoked one stops at once on
the revoking replica and within the cache's TTL on another; the gate builds each method's
wrapper once."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from controlplane.api.interceptors import Admission, Gate
from controlplane.auth.principal import Principal, Role
from controlplane.auth.service import AuthService
from controlplane.db.engine import Database
from controlplane.errors import Unauthenticated
from controlplane.metrics import Metrics

pytestmark = pytest.mark.timeout(60)

TTL = 0.3


async def test_a_key_revoked_on_another_replica_stops_within_the_ttl(db: Database) -> None:
    here, there = AuthService(db, cache_ttl=TTL), AuthService(db, cache_ttl=TTL)
    admin = Principal("platform", Role.ADMIN, "key_admin")
    await here.ensure_platform_tenant()
    created = await here.create_api_key(admin, "platform", Role.CONSUMER, "", None, None, "")
    secret = created.secret
    assert (await here.authenticate(secret)).principal_id == created.key.id
    assert (await there.authenticate(secret)).principal_id == created.key.id

    await here.revoke_api_key(created.key.id)
    with pytest.raises(Unauthenticated):  # the revoking replica: at once
        await here.authenticate(secret)
    # Another replica still trusts its cached verdict, but never past the TTL.
    assert (await there.authenticate(secret)).principal_id == created.key.id
    await asyncio.sleep(TTL + 0.05)
    with pytest.raises(Unauthenticated):
        await there.authenticate(secret)


async def test_the_gate_builds_each_methods_wrapper_once() -> None:
    async def authenticate(secret: str) -> Principal:
        return Principal("t", Role.CONSUMER, "key_1")

    def whoami(request: Any, context: Any) -> Any:
        return request

    handler = grpc.unary_unary_rpc_method_handler(whoami)
    gate = Gate(Metrics(), Admission(authenticate))

    async def continuation(details: Any) -> Any:
        return handler

    class Details:
        method = "/gpuplane.v1.AdminService/WhoAmI"
        invocation_metadata = (("authorization", "Bearer gpk_x"),)

    first = await gate.intercept_service(continuation, Details())  # type: ignore[arg-type]
    again = await gate.intercept_service(continuation, Details())  # type: ignore[arg-type]
    assert first is again
    assert first.unary_unary is not whoami  # wrapped: admitted, checked and counted
