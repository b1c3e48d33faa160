"""All SQL of the scheduler: lean reads of capacity and queue, batched GPU allocation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, func, insert, literal, select, text, update
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from controlplane.auth.models import Tenant
from controlplane.errors import Conflict
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.outbox.models import OutboxMessage
from controlplane.registry.models import Gpu, Host

# SQLite binds at most 32,766 variables per statement: allocate in chunks.
SQLITE_CHUNK = 500

# A GPU is given only while it is free and healthy and its host is schedulable at the price
# the plan charges: a plan made on an index loaded a moment ago (or reused, service.py) never
# places on a GPU, host or price that changed since.
PG_ALLOCATE = text(
    """
    UPDATE gpus AS g SET job_id = r.job_id, attempt = r.attempt
    FROM jsonb_to_recordset(CAST(:rows AS jsonb))
         AS r(uuid varchar, job_id varchar, attempt int, price bigint),
         hosts AS h
    WHERE g.uuid = r.uuid AND g.job_id IS NULL AND g.healthy
      AND h.id = g.host_id AND h.state = ANY(CAST(:states AS varchar[]))
      AND h.price_per_gpu_hour = r.price
    """
)


JOBS = cast(Table, Job.__table__)
# The columns a placement sets on its job (rows from jobs/states.schedule_jobs).
PLACED_COLUMNS = (
    ("state", "varchar"),
    ("state_reason", "varchar"),
    ("host_id", "varchar"),
    ("gpu_uuids", "json"),
    ("price_per_gpu_hour", "bigint"),
    ("event_seq", "integer"),
    ("updated_at", "timestamptz"),
)
PG_PLACE_JOBS = text(
    "UPDATE jobs AS j SET "
    + ", ".join(f"{c} = r.{c}" for c, _ in PLACED_COLUMNS)
    + " FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(b_id varchar, "
    + ", ".join(f"{c} {t}" for c, t in PLACED_COLUMNS)
    + ") WHERE j.id = r.b_id AND j.state = 'queued'"
)
SQLITE_PLACE_JOBS = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_id"), JOBS.c.state == "queued")
    .values({c: bindparam(c) for c, _ in PLACED_COLUMNS})
)
PG_SET_REASONS = text(
    "UPDATE jobs AS j SET state_reason = r.reason "
    "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(b_id varchar, reason varchar) "
    "WHERE j.id = r.b_id AND j.state = 'queued' AND j.state_reason <> r.reason"
)
SQLITE_SET_REASONS = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("b_id"), JOBS.c.state == "queued")
    .values(state_reason=bindparam("reason"))
)


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


@dataclass(slots=True)
class GpuGroup:
    """A host's healthy GPUs of one kind: the uuids of the free ones and of the busy ones."""

    host_id: str
    name: str
    memory_total_bytes: int
    compute_capability: str
    free: list[str]
    busy: list[str]


class SchedulerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @property
    def postgres(self) -> bool:
        return self.session.get_bind().dialect.name == "postgresql"

    async def hosts(self, states: Sequence[str]) -> Sequence[Any]:
        query = select(
            Host.id,
            Host.price_per_gpu_hour,
            Host.location,
            Host.labels,
            Host.simulated,
            Host.provider_tenant_id,
            Host.reliability_good,
            Host.reliability_bad,
            Host.reliability_at,
            Host.verified_at,
            Host.self_service,
        ).where(Host.state.in_(states))
        return (await self.session.execute(query)).all()

    async def registered_hosts(self) -> Sequence[Any]:
        """Every host not revoked, in any state (what could ever run a job)."""
        query = select(
            Host.id, Host.price_per_gpu_hour, Host.location, Host.labels, Host.simulated
        ).where(Host.revoked_at.is_(None))
        return (await self.session.execute(query)).all()

    async def registered_gpus(self) -> Sequence[Any]:
        """Every GPU, healthy or not, of hosts not revoked."""
        query = (
            select(Gpu.uuid, Gpu.host_id, Gpu.name, Gpu.memory_total_bytes, Gpu.compute_capability)
            .join(Host, Host.id == Gpu.host_id)
            .where(Host.revoked_at.is_(None))
        )
        return (await self.session.execute(query)).all()

    async def lost_on_hosts(self, job_ids: Sequence[str]) -> dict[str, set[str]]:
        """The hosts each job lost an attempt on (a provider fault): its retries avoid them."""
        if not job_ids:
            return {}
        query = select(JobAttempt.job_id, JobAttempt.host_id).where(
            JobAttempt.job_id.in_(job_ids), JobAttempt.lost.is_(True)
        )
        found: dict[str, set[str]] = {}
        for job_id, host_id in await self.session.execute(query):
            found.setdefault(job_id, set()).add(host_id)
        return found

    async def healthy_gpus(self, states: Sequence[str]) -> Sequence[Any]:
        """Healthy GPUs of hosts in `states`, by host then index."""
        query = (
            select(
                Gpu.uuid,
                Gpu.host_id,
                Gpu.name,
                Gpu.memory_total_bytes,
                Gpu.compute_capability,
                Gpu.job_id,
            )
            .join(Host, Host.id == Gpu.host_id)
            .where(Host.state.in_(states), Gpu.healthy.is_(True))
            .order_by(Gpu.host_id, Gpu.index)
        )
        return (await self.session.execute(query)).all()

    async def gpu_groups(self, states: Sequence[str]) -> list[GpuGroup]:
        """Healthy GPUs of hosts in `states`, one group per host and GPU kind: the uuids of
        its free ones and of its busy ones, each in index order. On PostgreSQL the database
        groups them (a row per host and kind instead of per GPU: a fleet of 4,000 hosts × 8
        GPUs is read with about half the CPU); elsewhere they are grouped here."""
        if self.session.get_bind().dialect.name != "postgresql":
            groups: dict[tuple[str, str, int, str], GpuGroup] = {}
            for uuid, host_id, name, memory, cc, job_id in await self.healthy_gpus(states):
                group = groups.get((host_id, name, memory, cc))
                if group is None:
                    group = groups[(host_id, name, memory, cc)] = GpuGroup(
                        host_id, name, memory, cc, [], []
                    )
                (group.free if job_id is None else group.busy).append(uuid)
            return list(groups.values())
        ordered = Gpu.uuid, Gpu.index
        query = (
            select(
                Gpu.host_id,
                Gpu.name,
                Gpu.memory_total_bytes,
                Gpu.compute_capability,
                func.array_agg(aggregate_order_by(*ordered)).filter(Gpu.job_id.is_(None)),
                func.array_agg(aggregate_order_by(*ordered)).filter(Gpu.job_id.is_not(None)),
            )
            .join(Host, Host.id == Gpu.host_id)
            .where(Host.state.in_(states), Gpu.healthy.is_(True))
            .group_by(Gpu.host_id, Gpu.name, Gpu.memory_total_bytes, Gpu.compute_capability)
        )
        connection = await self.session.connection()
        return [
            GpuGroup(host_id, name, memory, cc, list(free or ()), list(busy or ()))
            for host_id, name, memory, cc, free, busy in await connection.execute(query)
        ]

    async def live_attempts(self) -> Sequence[Any]:
        """(job id, tenant, GPU uuids, since) of every live attempt: what holds GPUs now."""
        since = func.coalesce(JobAttempt.started_at, JobAttempt.created_at)
        query = (
            select(JobAttempt.job_id, Job.tenant_id, JobAttempt.gpu_uuids, since.label("since"))
            .join(Job, Job.id == JobAttempt.job_id)
            .where(JobAttempt.live.is_(True))
        )
        return (await self.session.execute(query)).all()

    async def specs(self, job_ids: Sequence[str]) -> dict[str, bytes]:
        if not job_ids:
            return {}
        rows = await self.session.execute(select(Job.id, Job.spec).where(Job.id.in_(job_ids)))
        return {job_id: spec for job_id, spec in rows}

    async def any_queued(self, now: datetime) -> bool:
        """Whether a queued job's backoff has passed (a plain read, nothing locked)."""
        query = select(Job.id).where(_placeable(now)).limit(1)
        return await self.session.scalar(query) is not None

    async def queued(self, now: datetime, per_tenant: int, limit: int) -> Sequence[Job]:
        """Queued jobs whose backoff has passed, locked for this cycle (others skip them):
        at most `per_tenant` of each tenant and priority (its oldest), so one tenant's deep
        backlog never hides another tenant's jobs; highest priority first, then oldest."""
        placeable = _placeable(now)
        ranked = (
            select(
                Job.id,
                func.row_number()
                .over(
                    partition_by=(Job.tenant_id, Job.priority),
                    order_by=(Job.created_at, Job.id),
                )
                .label("rank"),
            )
            .where(placeable)
            .subquery()
        )
        chosen = (
            select(ranked.c.id)
            .where(ranked.c.rank <= per_tenant)
            .order_by(ranked.c.id)
            .limit(limit * 2)
        )
        # Ids first, then the rows by id: one statement joining the window query under FOR
        # UPDATE was planned as a nested loop (quadratic) on freshly filled tables.
        ids = list((await self.session.scalars(chosen)).all())
        if not ids:
            return []
        query = (
            select(Job)
            .where(Job.id.in_(ids), placeable)
            .order_by(Job.priority.desc(), Job.created_at, Job.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return (await self.session.scalars(query)).all()

    async def weights(self, tenant_ids: set[str]) -> dict[str, float]:
        """Fair-share weights of the tenants (AdminService CreateTenant fair_share_weight)."""
        if not tenant_ids:
            return {}
        rows = await self.session.execute(
            select(Tenant.id, Tenant.fair_share_weight).where(Tenant.id.in_(tenant_ids))
        )
        return {tenant: float(weight) for tenant, weight in rows}

    async def allocate(
        self, rows: Sequence[tuple[str, str, int, int]], states: Sequence[str]
    ) -> int:
        """Gives each (GPU uuid, job id, attempt, price per GPU-hour) its GPU if it is still
        free and healthy and its host is in one of `states` at that price, in one statement
        per chunk; returns how many were (all, or the caller rolls back)."""
        if not rows:
            return 0
        if self.postgres:
            payload = json.dumps(
                [{"uuid": u, "job_id": j, "attempt": a, "price": p} for u, j, a, p in rows]
            )
            params = {"rows": payload, "states": list(states)}
            result = await self.session.execute(PG_ALLOCATE, params)
            return int(getattr(result, "rowcount", 0))
        total = 0
        for start in range(0, len(rows), SQLITE_CHUNK):
            chunk = rows[start : start + SQLITE_CHUNK]
            jobs = {u: literal(j) for u, j, _, _ in chunk}
            attempts = {u: literal(a) for u, _, a, _ in chunk}
            prices = {u: literal(p) for u, _, _, p in chunk}
            host_price = (
                select(Host.price_per_gpu_hour)
                .where(Host.id == Gpu.host_id, Host.state.in_(states))
                .scalar_subquery()
            )
            statement = (
                update(Gpu)
                .where(
                    Gpu.uuid.in_(list(jobs)),
                    Gpu.job_id.is_(None),
                    Gpu.healthy.is_(True),
                    host_price == case(prices, value=Gpu.uuid),
                )
                .values(
                    job_id=case(jobs, value=Gpu.uuid),
                    attempt=case(attempts, value=Gpu.uuid),
                )
            )
            result = await self.session.execute(statement)
            total += int(getattr(result, "rowcount", 0))
        return total

    async def hosts_at(self, prices: dict[str, int], states: Sequence[str]) -> bool:
        """Whether every host named (host id → price per GPU-hour) is in one of `states` at
        that price now: what allocate checks for placements that take no GPU."""
        if not prices:
            return True
        rows = await self.session.execute(
            select(Host.id, Host.price_per_gpu_hour).where(
                Host.id.in_(list(prices)), Host.state.in_(states)
            )
        )
        return {host_id: price for host_id, price in rows} == prices

    async def place(
        self,
        jobs: Sequence[dict[str, Any]],
        attempts: Sequence[dict[str, Any]],
        events: Sequence[dict[str, Any]],
        messages: Sequence[dict[str, Any]],
    ) -> None:
        """Writes a cycle's placements in a few statements: each job (still queued) moves to
        its new state, with its attempt, its event row and its dispatch message."""
        if not jobs:
            return
        if self.postgres:
            payload = json.dumps(jobs, default=_iso)
            result = await self.session.execute(PG_PLACE_JOBS, {"rows": payload})
            if int(getattr(result, "rowcount", 0)) != len(jobs):
                raise Conflict("a placed job left the queue meanwhile; retrying the cycle")
        else:  # one writer at a time: the rows cannot change under this transaction
            await self.session.execute(SQLITE_PLACE_JOBS, list(jobs))
        await self.session.execute(insert(JobAttempt), list(attempts))
        await self.session.execute(insert(JobEvent), list(events))
        await self.session.execute(insert(OutboxMessage), list(messages))

    async def set_reasons(self, reasons: dict[str, str]) -> None:
        """Why each still-queued job waits ("why pending")."""
        if not reasons:
            return
        rows = [{"b_id": job_id, "reason": reason} for job_id, reason in reasons.items()]
        if self.postgres:
            await self.session.execute(PG_SET_REASONS, {"rows": json.dumps(rows)})
        else:
            await self.session.execute(SQLITE_SET_REASONS, rows)

    async def finished_gpu_time(self, since: datetime) -> Sequence[Any]:
        """(tenant, GPU uuids, run time ms, finished at) of attempts that ended after `since`
        and were not lost: the history fair share starts from."""
        query = (
            select(
                Job.tenant_id, JobAttempt.gpu_uuids, JobAttempt.run_time_ms, JobAttempt.finished_at
            )
            .join(Job, Job.id == JobAttempt.job_id)
            .where(
                JobAttempt.finished_at.is_not(None),
                JobAttempt.finished_at >= since,
                JobAttempt.lost.is_(False),
            )
        )
        return (await self.session.execute(query)).all()


def _placeable(now: datetime) -> ColumnElement[bool]:
    """A queued job whose backoff (not_before) has passed."""
    return and_(Job.state == "queued", (Job.not_before.is_(None)) | (Job.not_before <= now))
