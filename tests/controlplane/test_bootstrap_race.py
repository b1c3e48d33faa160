"""Control-plane replicas starting together on one fresh PostgreSQL: the one that loses the
race to create the platform tenant and the configured admin key starts anyway."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from controlplane.auth.models import ApiKey, Tenant
from controlplane.auth.principal import Role
from controlplane.auth.service import PLATFORM_TENANT, AuthService, hash_secret
from controlplane.db import migrate
from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from tests.controlplane.scheduler.planes import until

pytestmark = [pytest.mark.timeout(60), pytest.mark.postgres]


async def waiting_on_a_lock(db: Database) -> bool:
    async with db.read() as session:
        waiting = await session.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()"
            )
        )
    return bool(waiting)


async def test_the_replica_losing_the_bootstrap_race_still_starts(
    pg_url: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(migrate.upgrade, pg_url)
    key = f"gpk_{secrets.token_urlsafe(32)}"
    winner, loser = Database(pg_url), Database(pg_url)
    try:
        # The winner has inserted the tenant and the key but not committed yet: the loser
        # finds neither, inserts, waits on the unique indexes, and fails once we commit.
        async with winner.transaction() as session:
            session.add(Tenant(id=PLATFORM_TENANT, name=PLATFORM_TENANT, created_at=utcnow()))
            await session.flush()
            session.add(
                ApiKey(
                    id=new_id("key"),
                    tenant_id=PLATFORM_TENANT,
                    role=Role.ADMIN.value,
                    description="bootstrap admin key (from settings)",
                    prefix=key[:10],
                    secret_hash=hash_secret(key),
                    created_at=utcnow(),
                )
            )
            await session.flush()
            racing = asyncio.create_task(AuthService(loser).ensure_bootstrap_admin(key, tmp_path))
            await until(lambda: waiting_on_a_lock(winner), 20, "the loser waits on our insert")
        assert await asyncio.wait_for(racing, 20) is None

        async with winner.read() as session:
            tenants = await session.scalar(select(func.count()).select_from(Tenant))
            keys = await session.scalar(
                select(func.count()).where(ApiKey.secret_hash == hash_secret(key))
            )
        assert (tenants, keys) == (1, 1)
        principal = await AuthService(loser).authenticate(key)
        assert principal.role == Role.ADMIN
    finally:
        await winner.close()
        await loser.close()
