"""What tests read straight from PostgreSQL: who holds the scheduler lock, the lease row,
and whether any job or GPU was placed twice; and pg_terminate_backend."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import text

from controlplane.db.engine import Database
from controlplane.scheduler.leader import LEASE_NAME, LOCK_CLASS, LOCK_OBJECT


async def lock_holders(db: Database) -> list[int]:
    """Server pids of the sessions holding the scheduler's advisory lock."""
    async with db.read() as session:
        rows = await session.scalars(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                f" AND classid = {LOCK_CLASS} AND objid = {LOCK_OBJECT} AND objsubid = 2"
            )
        )
        return list(rows)


async def lease(db: Database) -> tuple[int, str] | None:
    """(epoch, holder) of the scheduler lease row."""
    async with db.read() as session:
        row = (
            await session.execute(
                text("SELECT epoch, holder FROM scheduler_lease WHERE name = :n"),
                {"n": LEASE_NAME},
            )
        ).one_or_none()
    return None if row is None else (int(row.epoch), str(row.holder))


async def terminate(db: Database, pid: int | None) -> None:
    """Ends one server session, as a dying network or an operator would."""
    assert pid is not None
    async with db.read() as session:
        assert await session.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


@dataclass
class Placements:
    attempts: dict[str, list[int]]  # job id -> its attempt numbers
    live_gpus: Counter[str]  # GPU uuid -> live attempts using it
    live_owners: dict[str, str]  # GPU uuid -> the job of a live attempt using it
    gpu_owners: dict[str, str]  # GPU uuid -> job that the registry says holds it
    scheduled_events: Counter[str]  # job id -> SCHEDULED transitions recorded
    dispatches: Counter[str]  # outbox msg id -> rows

    def assert_no_duplicates(self, jobs: list[str]) -> None:
        """Each job placed once (one attempt row, one SCHEDULED event, one dispatch row) and
        every GPU held by at most one live attempt, the one the registry names."""
        for job_id in jobs:
            assert self.attempts.get(job_id) == [1], (job_id, self.attempts.get(job_id))
            assert self.scheduled_events[job_id] == 1, job_id
            assert self.dispatches[f"{job_id}.1"] == 1, job_id
        assert all(n == 1 for n in self.live_gpus.values()), self.live_gpus
        assert all(n == 1 for n in self.dispatches.values()), self.dispatches
        assert self.gpu_owners == self.live_owners


async def placements(db: Database) -> Placements:
    async with db.read() as session:
        attempts: dict[str, list[int]] = {}
        live: Counter[str] = Counter()
        live_owners: dict[str, str] = {}
        for row in await session.execute(
            text("SELECT job_id, attempt, gpu_uuids, live FROM job_attempts ORDER BY attempt")
        ):
            attempts.setdefault(row.job_id, []).append(int(row.attempt))
            if row.live:
                live.update(row.gpu_uuids)
                live_owners.update((uuid, str(row.job_id)) for uuid in row.gpu_uuids)
        owners = {
            str(row.uuid): str(row.job_id)
            for row in await session.execute(
                text("SELECT uuid, job_id FROM gpus WHERE job_id IS NOT NULL")
            )
        }
        events = Counter(
            str(job_id)
            for job_id in await session.scalars(
                text("SELECT job_id FROM job_events WHERE state = 'scheduled'")
            )
        )
        dispatches = Counter(
            str(msg_id)
            for msg_id in await session.scalars(
                text("SELECT msg_id FROM outbox WHERE subject LIKE 'gpuplane.dispatch.%'")
            )
        )
    return Placements(attempts, live, live_owners, owners, events, dispatches)
