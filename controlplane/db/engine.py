"""The async engine for PostgreSQL (psycopg 3) or SQLite (aiosqlite) and the unit of work."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _configure_sqlite(engine: AsyncEngine, *, writer: bool) -> None:
    """WAL and foreign keys; writers BEGIN IMMEDIATE so they queue instead of failing on lock
    upgrade. Readers use plain deferred transactions: WAL gives them a snapshot, unblocked."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def create_engine(url: str, *, pool_size: int = 10, writer: bool = True) -> AsyncEngine:
    """An async engine for `url`; SQLite gets its concurrency pragmas."""
    if is_sqlite(url):
        engine = create_async_engine(url)
        _configure_sqlite(engine, writer=writer)
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


class Database:
    """Owns the engine; `transaction()` is the only unit-of-work boundary that commits."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = create_engine(url, writer=False) if is_sqlite(url) else self.engine
        self._read_sessions = async_sessionmaker(self._read_engine, expire_on_commit=False)

    @property
    def sqlite(self) -> bool:
        return is_sqlite(self.url)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on normal exit, rolled back on error."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only; never commits. Never open one inside `transaction()`
        on SQLite writers' behalf: use the transaction's own session instead."""
        async with self._read_sessions() as session:
            yield session

    async def close(self) -> None:
        await self.engine.dispose()
        if self._read_engine is not self.engine:
            await self._read_engine.dispose()
