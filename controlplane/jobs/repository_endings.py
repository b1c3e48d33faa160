"""SQL of batched terminal reports: jobs and attempts locked and read as detached rows in one
statement, then written back set-based with the events their setters recorded."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import class_mapper
from sqlalchemy.orm.attributes import instance_state

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
        query = (
            select(*_JOB_READ, *_ATTEMPT_READ)
            .join_from(JOBS, ATTEMPTS, ATTEMPTS.c.job_id == JOBS.c.id)
            .where(tuple_(ATTEMPTS.c.job_id, ATTEMPTS.c.attempt).in_(list(keys)))
            .order_by(JOBS.c.id, ATTEMPTS.c.attempt)
            .with_for_update()
        )
        split = len(_JOB_READ)
        job_names = [c.name for c in _JOB_READ]
        attempt_names = [c.name for c in _ATTEMPT_READ]
        found: dict[Key, tuple[Job, JobAttempt]] = {}
        for row in await self.session.execute(query):
            job = _detached(Job, dict(zip(job_names, row[:split], strict=True)))
            attempt = _detached(JobAttempt, dict(zip(attempt_names, row[split:], strict=True)))
            found[(attempt.job_id, attempt.attempt)] = (job, attempt)
        return found

    async def write_ended(self, pairs: Sequence[tuple[Job, JobAttempt]]) -> None:
        """Writes back what changed on detached pairs (one UPDATE statement for the jobs, one
        for the attempts, each run for the batch's rows) and inserts the recorded events in
        one statement."""
        jobs = [_changes(job, JOB_ENDED, "b_id", job.id) for job, _ in pairs]
        attempts = [
            _changes(attempt, ATTEMPT_ENDED, "b_job", attempt.job_id) for _, attempt in pairs
        ]
        for row, (_, attempt) in zip(attempts, pairs, strict=True):
            if row is not None:
                row["b_attempt"] = attempt.attempt
        connection = await self.session.connection()
        if changed := [row for row in jobs if row is not None]:
            await connection.execute(update(JOBS).where(JOBS.c.id == bindparam("b_id")), changed)
        if changed := [row for row in attempts if row is not None]:
            key = (ATTEMPTS.c.job_id == bindparam("b_job")) & (
                ATTEMPTS.c.attempt == bindparam("b_attempt")
            )
            await connection.execute(update(ATTEMPTS).where(key), changed)
        if self.events:
            rows = [{c: getattr(e, c) for c in _EVENT_COLUMNS} for e in self.events]
            await connection.execute(insert(EVENTS), rows)
            self.events = []


def _changes(
    row: Job | JobAttempt, columns: Sequence[str], key: str, id_: str
) -> dict[str, Any] | None:
    """The row's written columns (all of `columns`, so every row of a batch has the same
    statement) with its key, or None when nothing changed on it."""
    changed = instance_state(row).committed_state
    if not changed:
        return None
    unexpected = set(changed) - set(columns)
    if unexpected:
        raise AssertionError(f"{type(row).__name__} columns {sorted(unexpected)} not written")
    values = {c: getattr(row, c) for c in columns}
    values[key] = id_
    return values
