"""SQL for the gateway's routing table: services not deleted, their routable replicas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.jobs.models import Job
from controlplane.services.models import Service, ServiceReplica


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    """A replica whose end was not settled yet, as routing and the gauges need it."""

    service_id: str
    job_id: str
    host_id: str
    state: str
    ready: bool
    retired: bool


class RouteRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def services(self, service_ids: Sequence[str] | None) -> Sequence[Service]:
        """The services not deleted among `service_ids` (None: all of them)."""
        query = select(Service).where(Service.live_name.is_not(None))
        if service_ids is not None:
            query = query.where(Service.id.in_(service_ids))
        return (await self.session.scalars(query)).all()

    async def replicas(self, service_ids: Sequence[str] | None) -> list[ReplicaRow]:
        """The unsettled replicas of `service_ids` (None: of every service not deleted)."""
        query = (
            select(
                ServiceReplica.service_id,
                Job.id,
                Job.host_id,
                Job.state,
                ServiceReplica.ready,
                ServiceReplica.retired,
            )
            .join(Job, Job.id == ServiceReplica.job_id)
            .where(ServiceReplica.settled.is_(False))
        )
        if service_ids is not None:
            query = query.where(ServiceReplica.service_id.in_(service_ids))
        else:
            live = select(Service.id).where(Service.live_name.is_not(None))
            query = query.where(ServiceReplica.service_id.in_(live))
        rows = (await self.session.execute(query)).all()
        return [ReplicaRow(s, j, h or "", st, bool(r), bool(t)) for s, j, h, st, r, t in rows]

    async def services_of_jobs(self, job_ids: Sequence[str]) -> set[str]:
        """The services the jobs are replicas of (jobs that are none: left out)."""
        query = select(ServiceReplica.service_id).where(ServiceReplica.job_id.in_(job_ids))
        return set((await self.session.scalars(query)).all())
