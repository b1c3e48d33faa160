"""Scheduling leadership: exactly one control plane places jobs, and a stale one cannot.

On PostgreSQL the leader is the process whose dedicated connection holds a session-level
advisory lock; taking the lock starts a new term, numbered by incrementing the epoch of the
`scheduler_lease` row. Every placement transaction first reads that row FOR SHARE and goes
on only when it still holds this process's epoch (`fence`). Why that is enough:

- A new term's increment needs the row's exclusive lock, so it waits until every placement
  transaction of the old term (each holding FOR SHARE) has committed or rolled back; an old
  transaction that reaches the row after the increment reads the new epoch and aborts. So
  all placements of term N commit before term N+1 exists, and the new leader sees them.
- The lock goes when its session ends: a killed leader's socket closes, and the server ends
  the session at once. A frozen or partitioned leader stops running its checks; the server
  ends its idle lock session after `ttl` (idle_session_timeout) and any placement
  transaction it left idle after `ttl` too (idle_in_transaction_session_timeout, set by the
  fence), so a follower takes over after about `ttl` without waiting on it forever.
- The leader checks its lock connection every `check_interval` and steps down when the
  check fails or is late; the fence also refuses once no check has passed for `ttl`.

On SQLite there is one process per database file: it is the leader and the fence is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import NotLeader
from controlplane.scheduler.models import SchedulerLease

log = logging.getLogger(__name__)

LEASE_NAME = "scheduler"
# The advisory lock pg_try_advisory_lock(LOCK_CLASS, LOCK_OBJECT) ("gpup", 1); advisory
# locks are per database, so control planes of different databases never contend.
LOCK_CLASS = 0x67707570
LOCK_OBJECT = 1
_TAKE_LOCK = text(f"SELECT pg_try_advisory_lock({LOCK_CLASS}, {LOCK_OBJECT})")
_UNLOCK = text(f"SELECT pg_advisory_unlock({LOCK_CLASS}, {LOCK_OBJECT})")
# pg_locks shows a two-int4 advisory key as classid, objid with objsubid 2.
_CHECK = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    f" AND pid = pg_backend_pid() AND classid = {LOCK_CLASS} AND objid = {LOCK_OBJECT}"
    " AND objsubid = 2) AS held,"
    " (SELECT epoch FROM scheduler_lease WHERE name = :name) AS epoch"
)
_SET = text("SELECT set_config(:name, :value, :local)")

RELEASED = "released"

OnChange = Callable[[bool], None]


class Leadership(Protocol):
    """What the background loops and the scheduler need of a leadership."""

    @property
    def leading(self) -> bool: ...

    async def campaign(self) -> None:
        """Runs for the life of the process: takes, keeps and checks leadership."""

    async def wait_leading(self) -> None:
        """Returns once this process leads."""

    async def fence(self, session: AsyncSession) -> None:
        """Inside a placement transaction: raises NotLeader unless this process leads."""

    async def release(self) -> None:
        """Gives leadership up for good (shutdown); another process may take it at once."""


class SoleLeader:
    """SQLite: the one process on the database file leads from start to stop."""

    epoch = 0

    def __init__(self, on_change: OnChange | None = None) -> None:
        self.on_change = on_change
        self._leading = True

    @property
    def leading(self) -> bool:
        return self._leading

    async def campaign(self) -> None:
        if self._leading and self.on_change is not None:
            self.on_change(True)

    async def wait_leading(self) -> None:
        if not self._leading:
            await asyncio.Event().wait()  # released: never again

    async def fence(self, session: AsyncSession) -> None:
        if not self._leading:
            raise NotLeader("this control plane has stopped scheduling")

    async def release(self) -> None:
        if self._leading and self.on_change is not None:
            self.on_change(False)
        self._leading = False


class _Lost(Exception):
    """Leadership is gone (raised and handled inside the campaign only)."""


class PostgresLeader:
    """Leadership by advisory lock and epoch row on PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        check_interval: float = 1.0,
        ttl: float = 10.0,
        on_change: OnChange | None = None,
        holder: str | None = None,
    ) -> None:
        if ttl < 2 * check_interval:
            raise ValueError("the lease ttl must be at least two check intervals")
        # Its own engine without a pool: closing the connection really ends the session, and
        # with it the advisory lock (a pooled one would keep the lock alive in the pool).
        self.engine = create_async_engine(url, poolclass=NullPool)
        self.check_interval = check_interval
        self.ttl = ttl
        self.on_change = on_change
        self.holder = holder or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self.epoch: int | None = None
        # The server pid of the lock connection (pg_terminate_backend in tests, operators).
        self.backend_pid: int | None = None
        self._conn: AsyncConnection | None = None
        self._leading = asyncio.Event()
        self._confirmed_at = 0.0  # monotonic time of the last check that held the lock
        self._drop_pending = ""  # why the fence found this term over (the campaign acts)
        self._released = False

    @property
    def leading(self) -> bool:
        return self._leading.is_set()

    async def campaign(self) -> None:
        while not self._released:
            await self.tick()
            await asyncio.sleep(self.check_interval)

    async def wait_leading(self) -> None:
        await self._leading.wait()

    async def tick(self) -> bool:
        """One step: a follower tries to take leadership, the leader checks that it still
        holds it (else steps down). Returns whether this process leads."""
        try:
            if self._drop_pending:
                raise _Lost(self._drop_pending)
            if self.leading:
                async with asyncio.timeout(self.ttl / 4):
                    await self._check()
            else:
                # The server bounds the epoch increment's wait (lock_timeout); this is
                # only for a server that stopped answering.
                async with asyncio.timeout(2 * self.ttl):
                    await self._try_acquire()
        except (_Lost, SQLAlchemyError, OSError, TimeoutError) as error:
            why = str(error) or type(error).__name__
            if not self.leading:
                log.debug("scheduler lock not taken: %s", why)
            await self._drop(why)
        return self.leading

    async def fence(self, session: AsyncSession) -> None:
        epoch = self.epoch
        if not self.leading or epoch is None:
            raise NotLeader("this control plane is not the scheduling leader")
        if time.monotonic() - self._confirmed_at > self.ttl:
            self._demote(f"lock not confirmed for {self.ttl:.1f}s")
            raise NotLeader("scheduling leadership could not be confirmed in time")
        # A transaction left idle this long (a frozen leader) is ended by the server, so the
        # next term's epoch increment never waits on it for longer.
        await session.execute(
            _SET,
            {
                "name": "idle_in_transaction_session_timeout",
                "value": str(int(self.ttl * 1000)),
                "local": True,
            },
        )
        current = await session.scalar(
            select(SchedulerLease.epoch)
            .where(SchedulerLease.name == LEASE_NAME)
            .with_for_update(read=True)
        )
        if current != epoch:
            self._demote(f"epoch {epoch} superseded by {current}")
            raise NotLeader(f"scheduling term {epoch} is over (now {current})")

    async def release(self) -> None:
        self._released = True
        await self._drop(RELEASED)
        await self.engine.dispose()

    async def _connect(self) -> AsyncConnection:
        conn = await self.engine.connect()
        try:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            ms = str(int(self.ttl * 1000))
            settings = ["lock_timeout", "statement_timeout"]
            if (conn.dialect.server_version_info or (0,)) >= (14,):
                settings.append("idle_session_timeout")
            else:
                log.warning("PostgreSQL < 14: a frozen leader is replaced only once it dies")
            for name in settings:
                await conn.execute(_SET, {"name": name, "value": ms, "local": False})
            self.backend_pid = await conn.scalar(text("SELECT pg_backend_pid()"))
        except BaseException:
            await conn.invalidate()
            await conn.close()
            raise
        return conn

    async def _try_acquire(self) -> None:
        if self._conn is None:
            self._conn = await self._connect()
        conn = self._conn
        if not await conn.scalar(_TAKE_LOCK):
            return
        statement = insert(SchedulerLease).values(
            name=LEASE_NAME, epoch=1, holder=self.holder, acquired_at=utcnow()
        )
        statement = statement.on_conflict_do_update(
            index_elements=[SchedulerLease.name],
            set_={
                "epoch": SchedulerLease.epoch + 1,
                "holder": statement.excluded.holder,
                "acquired_at": statement.excluded.acquired_at,
            },
        )
        # Waits for the old term's placement transactions (see the module docstring).
        epoch = await conn.scalar(statement.returning(SchedulerLease.epoch))
        if epoch is None:
            raise _Lost("the lease row could not be written")
        self.epoch = epoch
        self._confirmed_at = time.monotonic()
        self._leading.set()
        log.info(
            "became the scheduling leader (epoch %d, %s, backend %s)",
            epoch,
            self.holder,
            self.backend_pid,
        )
        if self.on_change is not None:
            self.on_change(True)

    async def _check(self) -> None:
        assert self._conn is not None
        row = (await self._conn.execute(_CHECK, {"name": LEASE_NAME})).one()
        if not row.held:
            raise _Lost("the advisory lock is no longer held by this session")
        if row.epoch != self.epoch:
            raise _Lost(f"epoch {self.epoch} superseded by {row.epoch}")
        self._confirmed_at = time.monotonic()

    def _demote(self, why: str) -> None:
        """Stops leading at once; the lock connection is closed by the campaign."""
        self._drop_pending = why
        self._step_down(why)

    def _step_down(self, why: str) -> None:
        if self.leading:
            self._leading.clear()
            if why == RELEASED:
                log.info("gave scheduling leadership up (epoch %s)", self.epoch)
            else:
                log.warning("lost scheduling leadership (epoch %s): %s", self.epoch, why)
            if self.on_change is not None:
                self.on_change(False)
        self.epoch = None

    async def _drop(self, why: str) -> None:
        """Steps down (when leading) and closes the lock connection, ending the session and
        its lock; the next tick reconnects."""
        self._step_down(why)
        self._drop_pending = ""
        conn, self._conn, self.backend_pid = self._conn, None, None
        if conn is None:
            return
        if why != RELEASED:
            log.info("scheduler lock connection closed: %s", why)
        else:
            # Graceful: unlock before closing, so the lock is free when release() returns.
            # A closed socket frees it too, but only once the server has ended the backend,
            # a moment later, and a replica asking meanwhile would wait a whole check.
            with contextlib.suppress(SQLAlchemyError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await conn.execute(_UNLOCK)
        # Invalidate: close the socket without a reset round trip on a broken connection.
        with contextlib.suppress(SQLAlchemyError, OSError):
            await conn.invalidate()
        with contextlib.suppress(SQLAlchemyError, OSError):
            await conn.close()


def leadership_for(
    db: Database,
    *,
    check_interval: float,
    ttl: float,
    on_change: OnChange | None = None,
) -> SoleLeader | PostgresLeader:
    """The leadership for `db`'s backend: an advisory lock on PostgreSQL, the sole process
    on SQLite."""
    if db.sqlite:
        return SoleLeader(on_change)
    return PostgresLeader(db.url, check_interval=check_interval, ttl=ttl, on_change=on_change)
