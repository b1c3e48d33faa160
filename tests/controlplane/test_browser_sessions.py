"""Browser sessions on SQLite and PostgreSQL: login, resolution to the key's principal, idle
and absolute expiry, revocation and expiry of the key, logout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from controlplane.auth.browser_sessions import INVALID_KEY, BrowserSessions
from controlplane.auth.models import ApiKey, BrowserSession
from controlplane.auth.principal import Principal, Role
from controlplane.auth.service import AuthService, hash_secret
from controlplane.db import migrate
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import Unauthenticated

ADMIN = Principal("platform", Role.ADMIN, "key_admin")


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'browser-sessions.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    await asyncio.to_thread(migrate.upgrade, url)
    database = Database(url)
    try:
        yield database
    finally:
        await database.close()


async def new_key(auth: AuthService, role: Role = Role.CONSUMER) -> tuple[str, str]:
    """(key id, secret) of a new key of a new tenant."""
    tenant = await auth.create_tenant(ADMIN, f"t-{role.value}-{utcnow().timestamp()}", 1, None, "")
    created = await auth.create_api_key(ADMIN, tenant.id, role, "", None, None, "")
    return created.key.id, created.secret


async def count(db: Database) -> int:
    async with db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(BrowserSession)) or 0)


async def test_a_session_stands_for_its_key_until_logout(db: Database) -> None:
    auth, browser_sessions = AuthService(db), BrowserSessions(db, idle=3600, max_life=86400)
    await auth.ensure_platform_tenant()
    key_id, secret = await new_key(auth)
    login = await browser_sessions.login(secret)
    assert login.principal.principal_id == key_id
    assert login.token.startswith("gps_")
    assert await browser_sessions.authenticate(login.token) == login.principal
    async with db.read() as session:
        stored = await session.scalar(select(BrowserSession.token_hash))
    assert stored == hash_secret(login.token)  # only the hash is kept
    await browser_sessions.logout(login.token)
    with pytest.raises(Unauthenticated):
        await browser_sessions.authenticate(login.token)
    assert await count(db) == 0


async def test_refused_logins_all_say_the_same(db: Database) -> None:
    auth, browser_sessions = AuthService(db), BrowserSessions(db, idle=3600, max_life=86400)
    await auth.ensure_platform_tenant()
    revoked_id, revoked = await new_key(auth)
    await auth.revoke_api_key(revoked_id)
    expired_id, expired = await new_key(auth)
    async with db.transaction() as session:
        await session.execute(
            update(ApiKey).where(ApiKey.id == expired_id).values(expires_at=utcnow())
        )
    for secret in ("gpk_unknown", revoked, expired):
        with pytest.raises(Unauthenticated) as caught:
            await browser_sessions.login(secret)
        assert caught.value.message == INVALID_KEY
    assert await count(db) == 0


async def test_sessions_end_by_time_and_with_their_key(db: Database) -> None:
    auth, browser_sessions = AuthService(db), BrowserSessions(db, idle=3600, max_life=86400)
    await auth.ensure_platform_tenant()
    key_id, secret = await new_key(auth)
    idle, old, revoked = [await browser_sessions.login(secret) for _ in range(3)]
    long_ago = utcnow() - timedelta(hours=2)
    async with db.transaction() as session:
        for login, column in ((idle, "last_used_at"), (old, "expires_at")):
            await session.execute(
                update(BrowserSession)
                .where(BrowserSession.token_hash == hash_secret(login.token))
                .values({column: long_ago})
            )
    for ended in (idle, old):
        with pytest.raises(Unauthenticated):
            await browser_sessions.authenticate(ended.token)
    assert await browser_sessions.authenticate(revoked.token) == revoked.principal
    await auth.revoke_api_key(key_id)
    with pytest.raises(Unauthenticated):
        await browser_sessions.authenticate(revoked.token)
    # The next login (of any key) sweeps the browser_sessions that ended by time.
    _, other = await new_key(auth)
    await browser_sessions.login(other)
    assert await count(db) == 2  # the revoked key's (ends with it) and the new one


async def test_use_keeps_a_session_alive_past_its_idle_time(db: Database) -> None:
    auth, browser_sessions = AuthService(db), BrowserSessions(db, idle=3600, max_life=86400)
    await auth.ensure_platform_tenant()
    _, secret = await new_key(auth)
    login = await browser_sessions.login(secret)
    almost = utcnow() - timedelta(minutes=59)
    async with db.transaction() as session:
        await session.execute(update(BrowserSession).values(last_used_at=almost))
    await browser_sessions.authenticate(login.token)  # used: last_used_at moves to now
    async with db.read() as session:
        used = await session.scalar(select(BrowserSession.last_used_at))
    assert used is not None
    assert used > almost + timedelta(minutes=58)
