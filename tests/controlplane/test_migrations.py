"""Alembic migrations apply and roll back on SQLite and PostgreSQL and match the models."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select

from controlplane.auth.models import ApiKey, Tenant
from controlplane.auth.service import PLATFORM_TENANT, AuthService
from controlplane.db import migrate
from controlplane.db.engine import Database
from controlplane.db.models import Base

_counter = iter(range(1_000_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.db'}"
        return
    postgres: Any = request.getfixturevalue("postgres")
    name = f"migrations_{next(_counter)}"
    postgres.create_database(name)
    yield postgres.url(name)


def tables(url: str) -> set[str]:
    engine = create_engine(migrate.sync_url(url))
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


async def test_upgrade_then_downgrade(database_url: str) -> None:
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert set(Base.metadata.tables) <= await asyncio.to_thread(tables, database_url)
    assert await asyncio.to_thread(migrate.current_revision, database_url) is not None
    await asyncio.to_thread(migrate.downgrade, database_url, "base")
    assert await asyncio.to_thread(tables, database_url) == set()
    assert await asyncio.to_thread(migrate.current_revision, database_url) is None
    # And forward again: a rolled-back database upgrades cleanly.
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert set(Base.metadata.tables) <= await asyncio.to_thread(tables, database_url)


def _diff(url: str) -> list[Any]:
    engine = create_engine(migrate.sync_url(url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


async def test_migrations_match_models(database_url: str) -> None:
    await asyncio.to_thread(migrate.upgrade, database_url)
    assert await asyncio.to_thread(_diff, database_url) == []


@pytest.mark.postgres
def test_replicas_migrating_one_fresh_database_at_once_both_succeed(pg_url: str) -> None:
    # Two processes, as two replicas are (Alembic's context is per process). Without the
    # migration lock the second one's CREATE TABLE fails: the relation already exists.
    code = "import sys; from controlplane.db import migrate; migrate.upgrade(sys.argv[1])"
    children = [
        subprocess.Popen([sys.executable, "-c", code, pg_url], stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    head = migrate.current_revision(pg_url)
    assert head is not None
    migrate.upgrade(pg_url)
    assert migrate.current_revision(pg_url) == head


@pytest.mark.postgres
async def test_replicas_bootstrapping_one_fresh_database_at_once(
    pg_url: str, tmp_path: Path
) -> None:
    """Replicas starting together on a fresh database: one platform tenant, one generated
    admin key (its file written by exactly one replica), one row for a configured key."""
    await asyncio.to_thread(migrate.upgrade, pg_url)
    databases = [Database(pg_url) for _ in range(4)]
    try:
        services = [AuthService(db) for db in databases]
        written = await asyncio.gather(
            *(s.ensure_bootstrap_admin(None, tmp_path / f"r{n}") for n, s in enumerate(services))
        )
        files = [w for w in written if w is not None]
        assert len(files) == 1, written
        configured = "gpk_configured-bootstrap-key-0123456789"
        again = await asyncio.gather(
            *(s.ensure_bootstrap_admin(configured, tmp_path / "c") for s in services)
        )
        assert again == [None] * 4
        async with databases[0].read() as session:
            keys = (await session.scalars(select(ApiKey))).all()
            tenants = (await session.scalars(select(Tenant))).all()
        assert sorted(k.description for k in keys) == [
            "bootstrap admin key (from settings)",
            "bootstrap admin key (generated)",
        ]
        assert [t.id for t in tenants] == [PLATFORM_TENANT]
        secret = files[0].read_text().strip()
        assert (await services[1].authenticate(secret)) is not None
    finally:
        for db in databases:
            await db.close()
