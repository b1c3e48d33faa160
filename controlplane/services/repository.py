"""SQL for services, their replicas and their events."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.jobs.models import Job, JobAttempt
from controlplane.registry.models import Gpu, Host
from controlplane.services.models import Service, ServiceEvent, ServiceReplica

ENDED_SHOWN = 10


class ServiceRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, row: Service | ServiceEvent | ServiceReplica) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    async def get(self, service_id: str, *, lock: bool = False) -> Service | None:
        query = select(Service).where(Service.id == service_id)
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def find(self, caller: Principal, ref: str, *, lock: bool = False) -> Service | None:
        """The caller's service by id, or by name among those not deleted (an admin reads any
        by id); another tenant's is as absent as a missing one."""
        query = select(Service)
        if ref.startswith("svc_"):
            query = query.where(Service.id == ref)
            if not caller.is_admin:
                query = query.where(Service.tenant_id == caller.tenant_id)
        else:
            query = query.where(Service.tenant_id == caller.tenant_id, Service.live_name == ref)
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def by_live_name(self, tenant_id: str, name: str) -> Service | None:
        return await self.session.scalar(
            select(Service).where(Service.tenant_id == tenant_id, Service.live_name == name)
        )

    async def by_idempotency_key(self, tenant_id: str, key: str) -> Service | None:
        return await self.session.scalar(
            select(Service).where(Service.tenant_id == tenant_id, Service.idempotency_key == key)
        )

    async def of_tenant(self, tenant_id: str, include_deleted: bool) -> Sequence[Service]:
        query = select(Service).where(Service.tenant_id == tenant_id)
        if not include_deleted:
            query = query.where(Service.live_name.is_not(None))
        query = query.order_by(Service.created_at.desc(), Service.id.desc()).limit(1000)
        return (await self.session.scalars(query)).all()

    async def to_reconcile(self, limit: int) -> Sequence[str]:
        """Ids of the services that may need work: active ones, and others with a replica
        whose ending was not looked at yet (a stopped service's last replicas)."""
        pending = select(ServiceReplica.service_id).where(ServiceReplica.settled.is_(False))
        query = (
            select(Service.id)
            .where((Service.state == "active") | Service.id.in_(pending))
            .order_by(Service.id)
            .limit(limit)
        )
        return (await self.session.scalars(query)).all()

    async def replicas(
        self, service_ids: Sequence[str], *, all_ended: bool = False
    ) -> list[tuple[ServiceReplica, Job]]:
        """The services' replicas with their jobs, newest first: the unsettled ones and (for
        a view) up to ENDED_SHOWN ended ones of each; `all_ended`: every one."""
        query = (
            select(ServiceReplica, Job)
            .join(Job, Job.id == ServiceReplica.job_id)
            .where(ServiceReplica.service_id.in_(service_ids))
            .order_by(ServiceReplica.created_at.desc(), ServiceReplica.job_id)
        )
        rows = [(r, j) for r, j in (await self.session.execute(query)).all()]
        if all_ended:
            return rows
        kept: list[tuple[ServiceReplica, Job]] = []
        ended: dict[str, int] = {}
        for replica, job in rows:
            if replica.settled:
                ended[replica.service_id] = ended.get(replica.service_id, 0) + 1
                if ended[replica.service_id] > ENDED_SHOWN:
                    continue
            kept.append((replica, job))
        return kept

    async def charged(self, service_ids: Sequence[str]) -> dict[str, int]:
        """What each service's replicas were charged so far."""
        query = (
            select(ServiceReplica.service_id, func.coalesce(func.sum(Job.charged), 0))
            .join(Job, Job.id == ServiceReplica.job_id)
            .where(ServiceReplica.service_id.in_(service_ids))
            .group_by(ServiceReplica.service_id)
        )
        return {sid: int(total) for sid, total in (await self.session.execute(query)).all()}

    async def run_times(self, job_ids: Sequence[str]) -> dict[str, int]:
        """Each job's run time so far over its attempts (ms, as reported)."""
        if not job_ids:
            return {}
        query = (
            select(JobAttempt.job_id, func.coalesce(func.sum(JobAttempt.run_time_ms), 0))
            .where(JobAttempt.job_id.in_(job_ids))
            .group_by(JobAttempt.job_id)
        )
        return {jid: int(total) for jid, total in (await self.session.execute(query)).all()}

    async def replica(self, job_id: str, *, lock: bool = False) -> ServiceReplica | None:
        query = select(ServiceReplica).where(ServiceReplica.job_id == job_id)
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def hosts_with_free_gpus(self, gpus: int) -> set[str]:
        """Online hosts with at least `gpus` healthy GPUs no live attempt holds (any online
        host for 0): where a replica could go, for anti-affinity."""
        if gpus == 0:
            rows = await self.session.scalars(select(Host.id).where(Host.state == "online"))
            return set(rows.all())
        query = (
            select(Gpu.host_id)
            .join(Host, Host.id == Gpu.host_id)
            .where(Host.state == "online", Gpu.job_id.is_(None), Gpu.healthy.is_(True))
            .group_by(Gpu.host_id)
            .having(func.count() >= gpus)
        )
        return set((await self.session.scalars(query)).all())

    async def events(self, service_id: str, limit: int = 50) -> Sequence[ServiceEvent]:
        query = (
            select(ServiceEvent)
            .where(ServiceEvent.service_id == service_id)
            .order_by(ServiceEvent.id.desc())
            .limit(limit)
        )
        return (await self.session.scalars(query)).all()
