"""All SQL for jobs, attempts and job events."""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Select, Table, bindparam, case, insert, select, tuple_, update
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapper

from controlplane.auth.principal import Principal
from controlplane.db.prefix import starts_with
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.jobs.states import ON_HOST
from controlplane.paging import Page, PageRequest, page_newest_first
from controlplane.registry.models import Host
from controlplane.registry.utilization import GpuUtilization, MeasuredKey


class NewRows(list[Job | JobAttempt | JobEvent]):
    """Collects the rows states.new_job makes, for JobRepository.insert_new."""

    def add(self, row: Job | JobAttempt | JobEvent) -> None:
        self.append(row)


@functools.cache
def _columns(model: type[Job | JobEvent]) -> tuple[tuple[str, str], ...]:
    """(column key, attribute name) of each column a model maps."""
    mapper: Mapper[Any] = sa_inspect(model)
    return tuple((prop.columns[0].key, prop.key) for prop in mapper.column_attrs)


def _column_values(row: Job | JobEvent) -> dict[str, Any]:
    """Every column's value as the row holds it (None where unset)."""
    return {column: getattr(row, attribute) for column, attribute in _columns(type(row))}


JOB_TABLE, EVENT_TABLE = cast(Table, Job.__table__), cast(Table, JobEvent.__table__)
# A new job and its first event in one PostgreSQL statement (the job in a data-modifying CTE),
# built once with a named parameter per column ("j_" the job's, "e_" the event's): built per
# submit from the values, its 32 literal parameters cost more than executing it.
PG_INSERT_NEW = (
    insert(EVENT_TABLE)
    .values({c.key: bindparam(f"e_{c.key}", type_=c.type) for c in EVENT_TABLE.columns})
    .add_cte(
        insert(JOB_TABLE)
        .values({c.key: bindparam(f"j_{c.key}", type_=c.type) for c in JOB_TABLE.columns})
        .cte("new_job")
    )
)


class JobRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, row: Job | JobAttempt | JobEvent) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    async def insert_new(self, rows: Sequence[Job | JobAttempt | JobEvent]) -> None:
        """Inserts a new job and its first events as states.new_job built them (collected by
        NewRows), without the ORM's unit of work: on PostgreSQL in one statement, the job in
        a data-modifying CTE beside its events (a submit's hottest write, one round trip
        instead of two; states.new_job makes one event). The rows stay out of the session."""
        jobs = [_column_values(r) for r in rows if isinstance(r, Job)]
        events = [_column_values(r) for r in rows if isinstance(r, JobEvent)]
        assert len(jobs) + len(events) == len(rows), "only jobs and their events"
        if (
            len(jobs) == 1
            and len(events) == 1
            and self.session.get_bind().dialect.name == "postgresql"
        ):
            values = {f"j_{k}": v for k, v in jobs[0].items()}
            values.update((f"e_{k}", v) for k, v in events[0].items())
            await self.session.execute(PG_INSERT_NEW, values)
            return
        if jobs:
            await self.session.execute(insert(JOB_TABLE), jobs)
        if events:
            await self.session.execute(insert(EVENT_TABLE), events)

    async def get(self, job_id: str, *, lock: bool = False) -> Job | None:
        return await self.session.get(Job, job_id, with_for_update=lock)

    async def by_idempotency_key(self, tenant_id: str, key: str) -> Job | None:
        return await self.session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
        )

    @staticmethod
    def readable(caller: Principal) -> Select[Job]:
        """The jobs `caller` may see: its tenant's; every job for an admin."""
        query = select(Job)
        return query if caller.is_admin else query.where(Job.tenant_id == caller.tenant_id)

    async def get_readable(
        self, caller: Principal, job_id: str, *, lock: bool = False
    ) -> Job | None:
        """The job if `caller` may see it (a foreign job is as absent as a missing one)."""
        query = self.readable(caller).where(Job.id == job_id)
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def list(
        self,
        caller: Principal,
        tenant_id: str | None,
        states: Sequence[str],
        created_after: datetime | None,
        created_before: datetime | None,
        labels: Mapping[str, str],
        page: PageRequest,
        id_prefix: str = "",
    ) -> Page[Job]:
        """One page of the jobs `caller` may see (of `tenant_id` only, when given; with ids
        starting with `id_prefix`, when given), newest first."""
        query = self.readable(caller)
        if id_prefix:
            query = query.where(starts_with(Job.id, id_prefix))
        if tenant_id:
            query = query.where(Job.tenant_id == tenant_id)
        if states:
            query = query.where(Job.state.in_(states))
        # In the query, before the limit: a page holds `limit` matching jobs, not fewer.
        for key, value in labels.items():
            query = query.where(Job.labels[key].as_string() == value)
        if created_after:
            query = query.where(Job.created_at >= created_after)
        if created_before:
            query = query.where(Job.created_at < created_before)
        return await page_newest_first(
            self.session, query, (Job.created_at, Job.id), page, lambda j: (j.created_at, j.id)
        )

    async def running_with_prefix(self, id_prefix: str, limit: int) -> Sequence[Job]:
        """Running jobs whose id starts with `id_prefix` (interactive sessions: "ses_")."""
        query = (
            select(Job)
            .where(starts_with(Job.id, id_prefix), Job.state == "running")
            .order_by(Job.id)
            .limit(limit)
        )
        return (await self.session.scalars(query)).all()

    async def latest_events_like(
        self, job_ids: Collection[str], reason_prefix: str
    ) -> dict[str, str]:
        """The reason of each job's latest event whose reason starts with `reason_prefix`."""
        if not job_ids:
            return {}
        query = (
            select(JobEvent.job_id, JobEvent.reason)
            .where(JobEvent.job_id.in_(job_ids), JobEvent.reason.startswith(reason_prefix))
            .order_by(JobEvent.job_id, JobEvent.seq)
        )
        return {job_id: reason for job_id, reason in await self.session.execute(query)}

    async def queued(self, now: datetime, limit: int) -> Sequence[Job]:
        """Queued jobs whose backoff has passed, highest priority first, then oldest."""
        query = (
            select(Job)
            .where(Job.state == "queued", (Job.not_before.is_(None)) | (Job.not_before <= now))
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return (await self.session.scalars(query)).all()

    async def lock_jobs(self, job_ids: Collection[str]) -> dict[str, Job]:
        """Locks the jobs (one statement, id order); the ones that exist, by id."""
        query = (
            select(Job)
            .where(Job.id.in_(job_ids))
            .order_by(Job.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return {job.id: job for job in await self.session.scalars(query)}

    async def lock_attempts(
        self, keys: Collection[tuple[str, int]]
    ) -> dict[tuple[str, int], JobAttempt]:
        """Locks the attempts named (job id, attempt) (one statement, key order)."""
        query = (
            select(JobAttempt)
            .where(tuple_(JobAttempt.job_id, JobAttempt.attempt).in_(keys))
            .order_by(JobAttempt.job_id, JobAttempt.attempt)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return {(a.job_id, a.attempt): a for a in await self.session.scalars(query)}

    async def attempt(self, job_id: str, attempt: int, *, lock: bool = False) -> JobAttempt | None:
        return await self.session.get(JobAttempt, (job_id, attempt), with_for_update=lock)

    async def attempts(self, job_id: str) -> Sequence[JobAttempt]:
        return (
            await self.session.scalars(
                select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.attempt)
            )
        ).all()

    async def queued_of(self, tenant_id: str) -> Sequence[Job]:
        """The tenant's queued jobs, locked; those a scheduling cycle holds are skipped."""
        query = (
            select(Job)
            .where(Job.tenant_id == tenant_id, Job.state == "queued")
            .order_by(Job.id)
            .with_for_update(skip_locked=True)
        )
        return (await self.session.scalars(query)).all()

    async def on_host_of(self, tenant_id: str) -> Sequence[tuple[Job, JobAttempt]]:
        """The tenant's jobs on a host (scheduled to uploading), each with its attempt."""
        query = (
            select(Job, JobAttempt)
            .join(
                JobAttempt,
                (JobAttempt.job_id == Job.id) & (JobAttempt.attempt == Job.attempt),
            )
            .where(Job.tenant_id == tenant_id, Job.state.in_([s.value for s in ON_HOST]))
            .order_by(Job.id)
        )
        return [(job, attempt) for job, attempt in (await self.session.execute(query)).all()]

    async def add_utilization(self, measured: Mapping[MeasuredKey, GpuUtilization]) -> None:
        """Adds GPU utilisation measured from a host's telemetry to attempts placed on that
        host (sums and counts add, the peak is the larger; another host's claim is dropped):
        one statement for the batch, whatever the attempts' state."""
        table = cast(Table, JobAttempt.__table__)
        peak: Any = bindparam("p_peak", type_=BigInteger())
        statement = (
            update(table)
            .where(
                table.c.job_id == bindparam("p_job"),
                table.c.attempt == bindparam("p_attempt"),
                table.c.host_id == bindparam("p_host"),
            )
            .values(
                gpu_utilization_sum=table.c.gpu_utilization_sum + bindparam("p_sum"),
                gpu_utilization_samples=table.c.gpu_utilization_samples + bindparam("p_samples"),
                peak_gpu_memory_bytes=case(
                    (table.c.peak_gpu_memory_bytes < peak, peak),
                    else_=table.c.peak_gpu_memory_bytes,
                ),
            )
        )
        rows = [
            {
                "p_job": job_id,
                "p_attempt": attempt,
                "p_host": host_id,
                "p_sum": m.utilization_sum,
                "p_samples": m.samples,
                "p_peak": m.peak_memory_bytes,
            }
            for (job_id, attempt, host_id), m in sorted(measured.items())  # one lock order
        ]
        if rows:
            connection = await self.session.connection()
            await connection.execute(statement, rows)

    async def live_attempts_on(self, host_id: str) -> Sequence[JobAttempt]:
        return (
            await self.session.scalars(
                select(JobAttempt).where(JobAttempt.host_id == host_id, JobAttempt.live.is_(True))
            )
        ).all()

    async def live_on_hosts(self, host_ids: Sequence[str]) -> Sequence[tuple[str, str, int, str]]:
        """(host id, job id, attempt, attempt state) of every live attempt on these hosts."""
        if not host_ids:
            return []
        query = select(
            JobAttempt.host_id, JobAttempt.job_id, JobAttempt.attempt, JobAttempt.state
        ).where(JobAttempt.host_id.in_(host_ids), JobAttempt.live.is_(True))
        return [(h, j, a, st) for h, j, a, st in await self.session.execute(query)]

    async def over_budget(self, before: datetime, limit: int) -> Sequence[tuple[str, int, str]]:
        """(job id, attempt, host id) of running attempts whose budget deadline is before
        `before`, earliest first; the sweep locks each (job first, as reports do) and checks
        again."""
        query = (
            select(JobAttempt.job_id, JobAttempt.attempt, JobAttempt.host_id)
            .where(JobAttempt.budget_stop_at <= before, JobAttempt.live.is_(True))
            .order_by(JobAttempt.budget_stop_at)
            .limit(limit)
        )
        return [(job, attempt, host) for job, attempt, host in await self.session.execute(query)]

    async def lost_attempts(self, unacked_before: datetime) -> Sequence[tuple[JobAttempt, str]]:
        """Live attempts that are lost: their host is lost, or their daemon never took the
        dispatch (still SCHEDULED, placed before `unacked_before`). With the reason."""
        query = (
            select(JobAttempt, Host.state, Host.revoked_at)
            .join(Host, Host.id == JobAttempt.host_id)
            .where(
                JobAttempt.live.is_(True),
                (Host.state == "lost")
                | ((JobAttempt.state == "scheduled") & (JobAttempt.created_at < unacked_before)),
            )
            .with_for_update(of=JobAttempt, skip_locked=True)
        )
        rows = (await self.session.execute(query)).all()
        return [(attempt, _lost_why(state, revoked)) for attempt, state, revoked in rows]

    async def event_seqs(self, job_ids: Collection[str]) -> dict[str, int]:
        """{job id: its latest event's seq} of those of `job_ids` that exist."""
        query = select(Job.id, Job.event_seq).where(Job.id.in_(job_ids))
        return {job_id: seq for job_id, seq in (await self.session.execute(query)).all()}

    async def events_after(self, job_id: str, seq: int, limit: int = 500) -> Sequence[JobEvent]:
        return (
            await self.session.scalars(
                select(JobEvent)
                .where(JobEvent.job_id == job_id, JobEvent.seq > seq)
                .order_by(JobEvent.seq)
                .limit(limit)
            )
        ).all()


def _lost_why(host_state: str, revoked: datetime | None) -> str:
    if revoked is not None:
        return "host revoked"
    return "host lost (no heartbeat)" if host_state == "lost" else "daemon never took it"
