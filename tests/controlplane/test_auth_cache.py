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
from controlplane.auth.repository import AuthRepository
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


class CountedLookups:
    """AuthRepository.key_by_hash counted, its answer held back while `gate` is clear."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.gate = asyncio.Event()
        self.gate.set()
        original = AuthRepository.key_by_hash

        async def counted(repo: AuthRepository, secret_hash: str) -> Any:
            self.count += 1
            found = await original(repo, secret_hash)
            await self.gate.wait()
            return found

        monkeypatch.setattr(AuthRepository, "key_by_hash", counted)


async def _consumer_key(auth: AuthService) -> tuple[str, str]:
    admin = Principal("platform", Role.ADMIN, "key_admin")
    await auth.ensure_platform_tenant()
    created = await auth.create_api_key(admin, "platform", Role.CONSUMER, "", None, None, "")
    return created.secret, created.key.id


async def test_callers_missing_the_cache_together_share_one_lookup(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = AuthService(db, cache_ttl=TTL)
    secret, key_id = await _consumer_key(auth)
    lookups = CountedLookups(monkeypatch)
    lookups.gate.clear()
    callers = [asyncio.create_task(auth.authenticate(secret)) for _ in range(16)]
    await asyncio.sleep(0.05)
    # One caller going away does not take the lookup with it.
    callers[0].cancel()
    lookups.gate.set()
    answers = await asyncio.gather(*callers[1:])
    assert {a.principal_id for a in answers} == {key_id}
    assert lookups.count == 1
    # Cached now; after the TTL, one lookup again for the next crowd.
    await asyncio.gather(*(auth.authenticate(secret) for _ in range(16)))
    assert lookups.count == 1
    await asyncio.sleep(TTL + 0.05)
    await asyncio.gather(*(auth.authenticate(secret) for _ in range(16)))
    assert lookups.count == 2
    # A wrong secret: every caller of the crowd refused, by one lookup.
    results = await asyncio.gather(
        *(auth.authenticate("gpk_wrong") for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(r, Unauthenticated) for r in results)
    assert lookups.count == 3


async def test_a_revocation_during_a_lookup_is_not_undone_by_it(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = AuthService(db, cache_ttl=60)
    secret, key_id = await _consumer_key(auth)
    lookups = CountedLookups(monkeypatch)
    lookups.gate.clear()
    early = asyncio.create_task(auth.authenticate(secret))
    await asyncio.sleep(0.05)
    assert lookups.count == 1
    await auth.revoke_api_key(key_id)  # forgets the key here, while the lookup waits
    late = asyncio.create_task(auth.authenticate(secret))
    await asyncio.sleep(0.05)
    lookups.gate.set()
    # The caller that asked before the revocation gets what its lookup read before it; the
    # later one a lookup of its own, which reads the revocation.
    assert (await early).principal_id == key_id
    assert lookups.count == 2
    with pytest.raises(Unauthenticated):
        await late
    # ...and what the early lookup found was not cached: refused from now on.
    with pytest.raises(Unauthenticated):
        await auth.authenticate(secret)
    assert lookups.count == 3
