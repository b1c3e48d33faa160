"""All SQL of usage reports and efficiency: attempts of the jobs a report covers, with their
hosts' providers and measured utilisation, net charges per job, and GPU model names."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.jobs.models import Job, JobAttempt
from controlplane.ledger.models import Transfer
from controlplane.registry.models import Gpu, Host


class UsageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def usage_attempts(
        self,
        tenant_id: str | None,
        provider_tenant_id: str | None,
        job_id: str | None,
        start: datetime | None,
        end: datetime | None,
        limit: int,
    ) -> Sequence[Any]:
        """Per attempt of the matching started jobs (every tenant's when both tenants are
        None): job id, started_at, attempt, host and its provider, GPU uuids, run time,
        whether it was lost, its charge and measured utilisation; newest job first."""
        query = (
            select(
                Job.id.label("job_id"),
                Job.started_at,
                JobAttempt.attempt,
                JobAttempt.host_id,
                Host.provider_tenant_id,
                JobAttempt.gpu_uuids,
                JobAttempt.run_time_ms,
                JobAttempt.lost,
                JobAttempt.charged,
                JobAttempt.gpu_utilization_sum,
                JobAttempt.gpu_utilization_samples,
                JobAttempt.peak_gpu_memory_bytes,
            )
            .join(JobAttempt, JobAttempt.job_id == Job.id)
            .outerjoin(Host, Host.id == JobAttempt.host_id)
            .where(Job.started_at.is_not(None))
        )
        if tenant_id is not None:
            query = query.where(Job.tenant_id == tenant_id)
        if provider_tenant_id is not None:
            ran_there = (
                select(JobAttempt.job_id)
                .join(Host, Host.id == JobAttempt.host_id)
                .where(Host.provider_tenant_id == provider_tenant_id)
            )
            query = query.where(Job.id.in_(ran_there))
        if job_id:
            query = query.where(Job.id == job_id)
        if start:
            query = query.where(Job.started_at >= start)
        if end:
            query = query.where(Job.started_at < end)
        query = query.order_by(Job.started_at.desc(), Job.id.desc(), JobAttempt.attempt).limit(
            limit
        )
        return (await self.session.execute(query)).all()

    async def net_charges(
        self, job_ids: Sequence[str], revenue_account: str
    ) -> dict[str, tuple[int, int]]:
        """Per job: charges and fees minus refunds (what the consumer paid, net), and of that
        the platform's part (fees minus what refunds took back from `revenue_account`)."""
        signed = case(
            (Transfer.kind.in_(("charge", "fee")), Transfer.amount),
            (Transfer.kind == "refund", -Transfer.amount),
            else_=0,
        )
        fees = case(
            (Transfer.kind == "fee", Transfer.amount),
            (
                (Transfer.kind == "refund") & (Transfer.debit_account_id == revenue_account),
                -Transfer.amount,
            ),
            else_=0,
        )
        totals: dict[str, tuple[int, int]] = {}
        ids = list(job_ids)
        for i in range(0, len(ids), 500):
            query = (
                select(Transfer.job_id, func.sum(signed), func.sum(fees))
                .where(Transfer.job_id.in_(ids[i : i + 500]))
                .group_by(Transfer.job_id)
            )
            for job_id, net, fee in await self.session.execute(query):
                totals[job_id] = (int(net or 0), int(fee or 0))
        return totals

    async def gpu_names(self, uuids: Sequence[str]) -> dict[str, str]:
        if not uuids:
            return {}
        query = select(Gpu.uuid, Gpu.name).where(Gpu.uuid.in_(sorted(set(uuids))))
        return {u: n for u, n in await self.session.execute(query)}
