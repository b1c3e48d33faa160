"""Scheduling leadership on one PostgreSQL database, each leader driven tick by tick: one
leader at a time, strictly increasing epochs, and fencing of a stale leader (its lock
connection killed, or the process frozen past its lease)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db import migrate
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import NotLeader
from controlplane.jobs.notify import Notifier
from controlplane.outbox.models import OutboxMessage
from controlplane.scheduler.leader import PostgresLeader, SoleLeader, leadership_for
from controlplane.scheduler.models import SchedulerLease
from controlplane.scheduler.service import Scheduler
from tests.controlplane.scheduler.probes import lock_holders, terminate

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def leaders(db: Database) -> AsyncIterator[Callable[..., PostgresLeader]]:
    made: list[PostgresLeader] = []

    def make(check_interval: float = 0.2, ttl: float = 10.0) -> PostgresLeader:
        leader = PostgresLeader(db.url, check_interval=check_interval, ttl=ttl)
        made.append(leader)
        return leader

    try:
        yield make
    finally:
        for leader in made:
            await leader.release()


async def until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Polls `condition` until it holds; returns the seconds it took."""
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def marker(name: str) -> OutboxMessage:
    """A row standing for what a placement transaction writes."""
    return OutboxMessage(subject="test.fence", msg_id=name, payload=b"", created_at=utcnow())


async def place(db: Database, leader: PostgresLeader, name: str) -> None:
    """A placement transaction as the scheduler runs it: the fence first, then writes."""
    async with db.transaction() as session:
        await leader.fence(session)
        session.add(marker(name))


async def committed(db: Database, name: str) -> bool:
    async with db.read() as session:
        count = await session.scalar(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.msg_id == name)
        )
    return bool(count)


async def waiting_on_a_lock(db: Database, pid: int | None) -> bool:
    async with db.read() as session:
        event = await session.scalar(
            text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        )
    return bool(event == "Lock")


@pytest.mark.postgres
async def test_one_leader_at_a_time_with_increasing_epochs(
    db: Database, leaders: Callable[..., PostgresLeader]
) -> None:
    first, second = leaders(), leaders()
    assert await first.tick() is True
    assert await second.tick() is False
    assert await first.tick() is True  # the check passes: still the leader
    assert (first.leading, second.leading) == (True, False)
    assert first.epoch == 1
    assert second.epoch is None
    assert await lock_holders(db) == [first.backend_pid]
    async with db.read() as session:
        lease = await session.get(SchedulerLease, "scheduler")
    assert lease is not None
    assert (lease.epoch, lease.holder) == (1, first.holder)

    await first.release()  # graceful handover: the lock goes with the session
    assert first.leading is False
    assert await second.tick() is True
    assert second.epoch == 2
    assert await lock_holders(db) == [second.backend_pid]

    # The fence admits the leader's placements and nobody else's.
    await place(db, second, "by-leader")
    with pytest.raises(NotLeader):
        await place(db, first, "by-follower")
    assert await committed(db, "by-leader")
    assert not await committed(db, "by-follower")


@pytest.mark.postgres
async def test_a_leader_whose_lock_connection_died_commits_nothing(
    db: Database, leaders: Callable[..., PostgresLeader]
) -> None:
    stale, successor = leaders(), leaders()
    assert await stale.tick() is True
    await terminate(db, stale.backend_pid)  # its lock session is gone; it has not noticed
    assert await successor.tick() is True
    assert successor.epoch == 2
    assert stale.leading is True  # still believes it leads: only the fence stands between

    with pytest.raises(NotLeader, match="term 1 is over"):
        await place(db, stale, "stale")
    assert not await committed(db, "stale")
    assert stale.leading is False  # the fence made it step down at once
    # The scheduler's cycle runs the fence first: a stale one places nothing.
    with pytest.raises(NotLeader):
        await Scheduler(db, Notifier(), "bucket", fence=stale.fence).run_once()
    # It cannot come back while the successor holds the lock.
    assert await stale.tick() is False
    assert await successor.tick() is True
    assert await lock_holders(db) == [successor.backend_pid]


@pytest.mark.postgres
async def test_a_broken_lock_connection_is_noticed_at_the_next_check(
    db: Database, leaders: Callable[..., PostgresLeader]
) -> None:
    leader = leaders()
    assert await leader.tick() is True
    await terminate(db, leader.backend_pid)
    assert await leader.tick() is False  # the check fails: steps down without a fence
    assert leader.epoch is None
    assert await leader.tick() is True  # nobody else wanted it: a new term, a new epoch
    assert leader.epoch == 2


@pytest.mark.postgres
async def test_a_new_term_waits_for_the_old_terms_placement(
    db: Database, leaders: Callable[..., PostgresLeader]
) -> None:
    old, new = leaders(), leaders()
    assert await old.tick() is True
    async with db.transaction() as session:
        await old.fence(session)  # a placement of term 1 in flight ...
        await terminate(db, old.backend_pid)  # ... when its leader loses the lock
        takeover = asyncio.create_task(new.tick())
        await until(lambda: waiting_on_a_lock(db, new.backend_pid), 10, "the epoch increment waits")
        assert not takeover.done()
        assert not new.leading
        session.add(marker("term-1"))
    # Term 1's placement committed first; only then does term 2 begin, and it sees it.
    assert await asyncio.wait_for(takeover, 10) is True
    assert new.epoch == 2
    assert await committed(db, "term-1")
    with pytest.raises(NotLeader):
        await place(db, old, "term-1-late")


@pytest.mark.postgres
async def test_a_frozen_leader_is_replaced_and_its_open_placement_ends(
    db: Database, leaders: Callable[..., PostgresLeader]
) -> None:
    ttl = 1.5
    frozen, successor = leaders(check_interval=0.5, ttl=ttl), leaders()
    assert await frozen.tick() is True
    async with AsyncSession(db.engine) as session:  # a placement it never finishes
        await frozen.fence(session)
        session.add(marker("frozen"))
        await session.flush()
        # No more ticks from `frozen`: the server ends its idle lock session after the
        # ttl, and the transaction it left idle too, so the successor is not held up.
        took = await until(successor.tick, 4 * ttl, "the successor takes over")
        assert ttl * 0.5 < took < 3 * ttl
        assert successor.epoch == 2
        with pytest.raises(DBAPIError):  # the server ended the session
            await session.commit()
    assert not await committed(db, "frozen")
    # Thawed, it refuses on its own (no check passed within the ttl).
    with pytest.raises(NotLeader, match="confirmed"):
        await place(db, frozen, "thawed")


async def test_sqlite_has_a_sole_leader(tmp_path: Path) -> None:
    changes: list[bool] = []
    url = f"sqlite+aiosqlite:///{tmp_path / 'one.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    database = Database(url)
    try:
        leader = leadership_for(database, check_interval=1, ttl=10, on_change=changes.append)
        assert isinstance(leader, SoleLeader)
        await leader.campaign()
        assert leader.leading
        async with database.transaction() as session:
            await leader.fence(session)  # no-op
        await leader.release()
        assert changes == [True, False]
        with pytest.raises(NotLeader):
            await leader.fence(session)
    finally:
        await database.close()
