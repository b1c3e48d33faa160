"""The async engine for PostgreSQL (psycopg 3) or SQLite (aiosqlite) and the unit of work."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from controlplane.errors import Conflict

T = TypeVar("T")
# PostgreSQL SQLSTATEs after which the whole unit of work may simply run again:
# serialization_failure, deadlock_detected, and unique_violation (every unique key we race
# on is an idempotency key: the rerun finds the winner's row and replays it).
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "23505"})
DEFAULT_ATTEMPTS = 8


def retryable_sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE of `error` when rerunning its transaction may succeed, else None."""
    state = getattr(getattr(error, "orig", None), "sqlstate", None)
    return state if state in RETRYABLE_SQLSTATES else None


def database_unavailable(error: BaseException) -> bool:
    """Whether `error` means the database cannot be reached right now (connection refused or
    lost, server starting or shutting down, pool exhausted, SQLite busy): the request may
    succeed if retried later, so callers are told UNAVAILABLE, not INTERNAL."""
    if isinstance(error, SQLAlchemyTimeoutError):
        return True  # no pooled connection came free in time
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        return True
    orig = getattr(error, "orig", error)
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        state = getattr(orig, "sqlstate", None) or ""
        # Connection failures carry no SQLSTATE or class 08; 57P0x: shutdown, starting up.
        return state == "" or state.startswith("08") or state.startswith("57P")
    if isinstance(orig, sqlite3.OperationalError):
        text = str(orig).lower()
        return "locked" in text or "busy" in text or "unable to open" in text
    return False


def backoff_seconds(attempt: int) -> float:
    """Jittered exponential backoff: ~2 ms, 4 ms, 8 ms … capped at ~100 ms."""
    return min(0.002 * (1 << min(attempt, 16)), 0.1) * random.uniform(0.5, 1.5)


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
        # One writer connection: writers queue FIFO for it on the event loop instead of in
        # SQLite's busy handler, whose sleeps (up to 100 ms each, unfair) stall requests.
        pool = {"pool_size": 1, "max_overflow": 0} if writer else {}
        engine = create_async_engine(url, **pool)
        _configure_sqlite(engine, writer=writer)
        return engine
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
    _ping_idle_connections(engine)
    return engine


# A pooled connection idle longer than this is pinged before use; a busy pool's connections
# (checked in a moment ago) go straight back to work.
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """SQLAlchemy's pool_pre_ping, but only for connections idle past PING_AFTER_IDLE_SECONDS:
    pre_ping costs every transaction a round trip (a tenth of a small transaction's time), yet
    a connection that served a transaction within the last second has not gone stale in any
    way a ping would catch before the transaction itself does. A failed ping raises
    DisconnectionError, on which the pool discards the connection (and every older one) and
    hands out a fresh one, as pre_ping does."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in = record.info.get("checked_in")
        if checked_in is None or time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS:
            return  # new (just connected) or busy
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception as error:  # noqa: BLE001 - any failure means: do not use it
            raise DisconnectionError(f"pooled connection failed its ping: {error}") from error


class Database:
    """Owns the engine; `transaction()` is the only unit-of-work boundary that commits."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.engine = create_engine(url, pool_size=pool_size)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = create_engine(url, writer=False) if is_sqlite(url) else self.engine
        self._read_sessions = async_sessionmaker(self._read_engine, expire_on_commit=False)
        # Reruns by `run()`, by SQLSTATE (40P01 = deadlocks), for metrics and benchmarks.
        self.retries: Counter[str] = Counter()

    @property
    def sqlite(self) -> bool:
        return is_sqlite(self.url)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on normal exit, rolled back on error."""
        async with self._sessions() as session, session.begin():
            yield session

    async def run(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        *,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> T:
        """Runs `work(session)` in one transaction and commits; on a serialization failure,
        deadlock or unique-key race (PostgreSQL) rolls back and runs the whole unit again,
        with jittered backoff, at most `attempts` times, then answers Conflict (ABORTED).

        `work` must have no effect outside the transaction: it may run more than once."""
        for attempt in range(attempts):
            try:
                async with self.transaction() as session:
                    return await work(session)
            except DBAPIError as error:
                state = retryable_sqlstate(error)
                if state is None:
                    raise
                self.retries[state] += 1
                if attempt == attempts - 1:
                    raise Conflict(
                        "the database kept reporting concurrent changes; retry the request"
                    ) from error
                await asyncio.sleep(backoff_seconds(attempt))
        raise AssertionError("unreachable")

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
