"""SQL of batched terminal reports: jobs and attempts locked and read as detached rows in one
statement, then written back set-based with the events their setters recorded."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import class_mapper
from sqlalchemy.orm.attributes import instance_state

from controlplane.jobs import repository_endings_pg as pg
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.jobs.repository import JobRepository

JOBS = cast(Table, Job.__table__)
ATTEMPTS = cast(Table, JobAttempt.__table__)
EVENTS = cast(Table, JobEvent.__table__)
# What an ending reads: every column but the JSON lists it never uses (decoding them is a
# good part of what reading a row costs).
_JOB_READ = [c for c in JOBS.columns if c.name not in ("labels", "gpu_uuids")]
_ATTEMPT_READ = [c for c in ATTEMPTS.columns if c.name != "gpu_uuids"]
# What applying a terminal report (its setters, billing and provenance) may change; anything
# else changed on a detached row is a bug that write_ended refuses rather than loses.
JOB_ENDED = ("state", "state_reason", "exit_code", "event_seq", "charged", "updated_at",
             "finished_at")  # fmt: skip
ATTEMPT_ENDED = (
    "state", "reason", "live", "lost", "report_seq", "run_time_ms", "exit_code", "charged",
    "manifest", "finished_at", "budget_stop_at", "host_provenance", "host_provenance_signature",
    "provenance", "capped_reports",
)  # fmt: skip
_EVENT_COLUMNS = tuple(c.name for c in EVENTS.columns)

Key = tuple[str, int]


def _detached(cls: type[Job] | type[JobAttempt], values: dict[str, Any]) -> Any:
    """An instance of `cls` holding `values`, in no session: its setters work on it as on a
    loaded one, and only write_ended stores it (no unit of work, no identity map)."""
    instance = class_mapper(cls).class_manager.new_instance()
    instance.__dict__.update(values)
    return instance


class EndingRows(JobRepository):
    """A JobRepository for the terminal reports of a batch: the jobs and attempts they end
    are read detached (lock_ending); the events the setters record on them are kept here
    (`events`) and written with them (write_ended)."""

    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session)
        self.events: list[JobEvent] = []
        # The holds of the jobs lock_ending read, by job id (PostgreSQL; else empty).
        self.holds: dict[str, str] = {}
        self.postgres = session.get_bind().dialect.name == "postgresql"

    def add(self, row: Job | JobAttempt | JobEvent) -> None:
        if isinstance(row, JobEvent):
            self.events.append(row)
        else:
            raise TypeError(f"a detached batch adds only job events, not {type(row).__name__}")

    async def lock_ending(self, keys: Collection[Key]) -> dict[Key, tuple[Job, JobAttempt]]:
        """Locks the attempts named (job id, attempt) and their jobs, in one statement (job id
        order, as lock_jobs then lock_attempts would); each found as a detached pair."""
        if not keys:
            return {}
        if self.postgres:
            rows = await pg.lock(self.session, _LOCK_PG, sorted(keys), _TIMES)
            self.holds = {row[0]: row[-1] for row in rows if row[-1] is not None}
        else:
            rows = [list(row) for row in await self.session.execute(_lock_query(keys))]
        split = len(_JOB_READ)
        found: dict[Key, tuple[Job, JobAttempt]] = {}
        for row in rows:
            job = _detached(Job, dict(zip(_JOB_NAMES, row[:split], strict=False)))
            values = row[split : split + len(_ATTEMPT_NAMES)]
            attempt = _detached(JobAttempt, dict(zip(_ATTEMPT_NAMES, values, strict=True)))
            found[(attempt.job_id, attempt.attempt)] = (job, attempt)
        return found

    async def write_ended(
        self, pairs: Sequence[tuple[Job, JobAttempt]], *, commit: bool = False
    ) -> None:
        """Writes back what changed on detached pairs (one UPDATE for the jobs, one for the
        attempts) and inserts the recorded events (one INSERT); on PostgreSQL all three in
        one round trip. `commit` (PostgreSQL): these are the transaction's last writes and
        nothing is pending in the session, so the COMMIT travels in the same round trip (as
        the ledger's posts do); the unit of work's own commit then finds nothing to do."""
        jobs = [_changes(job, JOB_ENDED) for job, _ in pairs]
        attempts = [_changes(attempt, ATTEMPT_ENDED) for _, attempt in pairs]
        job_rows = [(j.id, *row) for (j, _), row in zip(pairs, jobs, strict=True) if row]
        attempt_rows = [
            (a.job_id, a.attempt, *row) for (_, a), row in zip(pairs, attempts, strict=True) if row
        ]
        event_rows = [tuple(getattr(e, c) for c in _EVENT_COLUMNS) for e in self.events]
        self.events = []
        if self.postgres:
            statements = [
                (_UPDATE_JOBS_PG, _JOB_WRITE_PG, job_rows),
                (_UPDATE_ATTEMPTS_PG, _ATTEMPT_WRITE_PG, attempt_rows),
                (_INSERT_EVENTS_PG, _EVENTS_PG, event_rows),
            ]
            await pg.write(self.session, statements, commit=commit and not self.session.dirty)
            return
        key = (ATTEMPTS.c.job_id == bindparam("b_job")) & (
            ATTEMPTS.c.attempt == bindparam("b_attempt")
        )
        writes = (
            (update(JOBS).where(JOBS.c.id == bindparam("b_id")), ("b_id", *JOB_ENDED), job_rows),
            (update(ATTEMPTS).where(key), ("b_job", "b_attempt", *ATTEMPT_ENDED), attempt_rows),
            (insert(EVENTS), _EVENT_COLUMNS, event_rows),
        )
        connection = await self.session.connection()
        for statement, names, rows in writes:
            if rows:
                await connection.execute(
                    statement, [dict(zip(names, r, strict=True)) for r in rows]
                )


def _lock_query(keys: Collection[Key]) -> Select[Any]:
    return (
        select(*_JOB_READ, *_ATTEMPT_READ)
        .join_from(JOBS, ATTEMPTS, ATTEMPTS.c.job_id == JOBS.c.id)
        .where(tuple_(ATTEMPTS.c.job_id, ATTEMPTS.c.attempt).in_(list(keys)))
        .order_by(JOBS.c.id, ATTEMPTS.c.attempt)
        .with_for_update()
    )


def _changes(row: Job | JobAttempt, columns: Sequence[str]) -> tuple[Any, ...] | None:
    """The row's written columns (all of `columns`, so every row of a batch has the same
    statement), or None when nothing changed on it."""
    changed = instance_state(row).committed_state
    if not changed:
        return None
    unexpected = set(changed) - set(columns)
    if unexpected:
        raise AssertionError(f"{type(row).__name__} columns {sorted(unexpected)} not written")
    return tuple(getattr(row, c) for c in columns)


_JOB_NAMES = [c.name for c in _JOB_READ]
_ATTEMPT_NAMES = [c.name for c in _ATTEMPT_READ]
_LOCK_PG = pg.lock_statement(_JOB_NAMES, _ATTEMPT_NAMES)
# Where the timestamps are in a locked row.
_TIMES = [n for n, c in enumerate((*_JOB_READ, *_ATTEMPT_READ)) if pg.pg_type(c) == "timestamptz"]
_JOB_WRITE_PG = pg.typed(JOBS, ("id", *JOB_ENDED))
_ATTEMPT_WRITE_PG = pg.typed(ATTEMPTS, ("job_id", "attempt", *ATTEMPT_ENDED))
_EVENTS_PG = pg.typed(EVENTS, _EVENT_COLUMNS)
_UPDATE_JOBS_PG = pg.update_statement("jobs", _JOB_WRITE_PG[:1], _JOB_WRITE_PG[1:])
_UPDATE_ATTEMPTS_PG = pg.update_statement(
    "job_attempts", _ATTEMPT_WRITE_PG[:2], _ATTEMPT_WRITE_PG[2:]
)
_INSERT_EVENTS_PG = pg.insert_statement("job_events", _EVENTS_PG)
