"""Liveness when the database is slow or failing (a reconnect storm queues every writer behind
one SQLite connection): a heartbeat is never forgotten nor back-dated, so no live host is
marked lost. A second RegistryService on the plane's database, without background loops, is
driven by hand; the plane's own liveness timeout is long enough never to interfere."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.service import RegistryService
from devstack.factories import new_online_host
from tests.harness import JobPlane

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.plane(heartbeat_timeout_ms=600_000),
    pytest.mark.databases("sqlite", "postgresql"),
]
TIMEOUT = timedelta(seconds=30)


class SlowDatabase:
    """The plane's database, whose next transaction first waits `delay` seconds (a writer
    queued behind others) or fails with OSError (`fail`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.delay = 0.0
        self.fail = False

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        if self.fail:
            self.fail = False
            raise OSError("the database went away")
        await asyncio.sleep(self.delay)
        self.delay = 0.0
        async with self.db.transaction() as session:
            yield session

    def read(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
        return self.db.read()


async def connected(plane: JobPlane) -> tuple[RegistryService, SlowDatabase, str]:
    """A host online, connected to a fresh RegistryService over a SlowDatabase."""
    assert plane.plane.db is not None
    host = await new_online_host(plane.channel, await plane.token())
    slow = SlowDatabase(plane.plane.db)
    registry = RegistryService(slow, max_price=10**12)  # type: ignore[arg-type]
    await registry.connect(host.host_id)
    return registry, slow, host.host_id


async def last_heartbeat(plane: JobPlane, host_id: str, set_to: datetime | None = None) -> datetime:
    assert plane.plane.db is not None
    async with plane.plane.db.transaction() as session:
        host = await RegistryRepository(session).get_host(host_id)
        assert host is not None
        assert host.last_heartbeat_at is not None
        if set_to is not None:
            host.last_heartbeat_at = set_to
        return host.last_heartbeat_at


async def test_a_heartbeat_a_failed_flush_could_not_write_is_written_by_the_next(
    plane: JobPlane,
) -> None:
    registry, slow, host_id = await connected(plane)
    await last_heartbeat(plane, host_id, set_to=utcnow() - 2 * TIMEOUT)
    await registry.heartbeat(host_id)  # heard: written at the next flush
    slow.fail = True
    with pytest.raises(OSError, match="went away"):
        await registry.flush_heartbeats()
    before = utcnow()
    assert await registry.stale_hosts(TIMEOUT, before) == []
    assert await last_heartbeat(plane, host_id) >= before


async def test_a_heartbeat_that_waited_for_the_database_is_recorded_as_of_its_write(
    plane: JobPlane,
) -> None:
    registry, slow, host_id = await connected(plane)
    await last_heartbeat(plane, host_id, set_to=utcnow() - 2 * TIMEOUT)
    lost = await registry.stale_hosts(TIMEOUT, utcnow())
    assert lost == [host_id]
    # Lost: its next heartbeat takes the full path (a write), which waits its turn.
    slow.delay = 1.0
    asked = utcnow()
    await registry.heartbeat(host_id)
    assert await last_heartbeat(plane, host_id) >= asked + timedelta(seconds=1)


async def test_an_answered_hello_counts_as_heard(plane: JobPlane) -> None:
    registry, _, host_id = await connected(plane)
    # The hello's own write is old by the time its ack leaves (reads queued in between).
    await last_heartbeat(plane, host_id, set_to=utcnow() - 2 * TIMEOUT)
    registry.acknowledged(host_id)
    before = utcnow()
    assert await registry.stale_hosts(TIMEOUT, before) == []
    assert await last_heartbeat(plane, host_id) >= before
