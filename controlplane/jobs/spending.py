"""Monthly spending limits while jobs run: a tenant whose month (charges and what its
running jobs have run up since their last charge) reaches its limit has its jobs on hosts
stopped (STOP_REASON_SPENDING_LIMIT) and its queued jobs cancelled, and every threshold
crossed is recorded once."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from gpuplane.v1 import types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.jobs.billing import JobBilling, StopReason
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import ON_HOST, JobState, set_job_state
from controlplane.ledger import service as ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TenantSpend:
    """One tenant's month as the check saw it."""

    tenant_id: str
    monthly_limit: int
    # The month's spend plus what its running attempts have run up and not been charged.
    usage: int
    # Thresholds this check recorded (percents), and the jobs it stopped or cancelled.
    alerts: list[int] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.usage / self.monthly_limit if self.monthly_limit else 0.0


def accrued(job: Job, attempt: JobAttempt, now: datetime) -> int:
    """What a running attempt has cost beyond what it was charged: its run time so far (the
    larger of the reported one and the wall clock since it started, capped at max_duration)
    at its placement's price."""
    if attempt.started_at is None or attempt.lost:
        return 0
    wall_ms = int((now - attempt.started_at).total_seconds() * 1000)
    run_ms = max(attempt.run_time_ms, wall_ms)
    limit_ms = types_pb2.JobSpec.FromString(job.spec).max_duration_seconds * 1000
    if limit_ms:
        run_ms = min(run_ms, limit_ms)
    cost = ledger.charge_for(job.price_per_gpu_hour, job.gpu_count, run_ms)
    return max(0, cost - attempt.charged)


def stop_text(monthly_limit: int) -> str:
    return (
        "spending limit: this month's spend reached the monthly limit of "
        f"{ledger.format_credits(monthly_limit)} credits"
    )


class SpendingLimits(JobBilling):
    """Part of JobService: the monthly spending limits, enforced while jobs run."""

    async def enforce_spending_limits(self) -> list[TenantSpend]:
        """Checks every limited tenant once (each in a transaction of its own): records the
        thresholds its month has reached and, at the limit, asks its jobs on hosts to stop
        through the cancel path and cancels its queued ones. Idempotent: a job asked already
        is not asked again."""
        spends: list[TenantSpend] = []
        for tenant_id in await self.ledger.limited_tenants():
            now = utcnow()

            async def work(
                session: AsyncSession, tenant_id: str = tenant_id, now: datetime = now
            ) -> tuple[TenantSpend, list[str]]:
                return await self._check_tenant(session, tenant_id, now)

            spend, hosts = await self.db.run(work)
            for host_id in hosts:
                self.streams.wake(host_id)
            for job_id in spend.stopped:
                self.notifier.job_changed(job_id)
            if spend.alerts:
                log.warning(
                    "tenant %s reached %s%% of its monthly spending limit",
                    tenant_id,
                    "%, ".join(map(str, spend.alerts)),
                )
            spends.append(spend)
        return spends

    async def _check_tenant(
        self, session: AsyncSession, tenant_id: str, now: datetime
    ) -> tuple[TenantSpend, list[str]]:
        """Records the tenant's alerts and, at its limit, stores the stops of its jobs on
        hosts (returns those hosts, to wake their delivery after commit) and cancels its
        queued jobs."""
        budget = await self.ledger.budget_in(session, tenant_id, now)
        repo = JobRepository(session)
        on_host = await repo.on_host_of(tenant_id)
        usage = budget.spent + sum(accrued(job, attempt, now) for job, attempt in on_host)
        spend = TenantSpend(tenant_id, budget.monthly_limit, usage)
        if not budget.monthly_limit:
            return spend, []  # removed since the list was read
        spend.alerts.extend(await self.ledger.record_alerts(session, budget, usage, now))
        if usage < budget.monthly_limit:
            return spend, []
        text = stop_text(budget.monthly_limit)
        hosts = await self._stop_on_host(session, [job for job, _ in on_host], text, spend, now)
        await self._cancel_queued(session, repo, text, spend, now)
        return spend, hosts

    async def _stop_on_host(
        self, session: AsyncSession, jobs: list[Job], text: str, spend: TenantSpend, now: datetime
    ) -> list[str]:
        """Asks each job still on its host, and not asked before, to stop (a stored cancel
        command, as `cancel()` sends); returns the hosts to wake."""
        repo = JobRepository(session)
        hosts: list[str] = []
        for job in jobs:
            locked = await repo.get(job.id, lock=True)
            if (
                locked is None
                or locked.cancel_requested
                or locked.attempt != job.attempt
                or JobState(locked.state) not in ON_HOST
            ):
                continue
            locked.cancel_requested = True
            # Kept until the daemon's report: it becomes the CANCELLED reason.
            locked.state_reason = text
            command = self._cancel_command(locked, StopReason.STOP_REASON_SPENDING_LIMIT, text)
            await self._command(session, locked, command, now)
            hosts.append(locked.host_id or "")
            spend.stopped.append(locked.id)
        return hosts

    async def _cancel_queued(
        self,
        session: AsyncSession,
        repo: JobRepository,
        text: str,
        spend: TenantSpend,
        now: datetime,
    ) -> None:
        """Cancels the tenant's queued jobs (they could only run past the limit, which was
        lowered below what their holds assumed): their holds settle, nothing charged."""
        for job in await repo.queued_of(spend.tenant_id):
            if set_job_state(repo, job, JobState.CANCELLED, reason=text, now=now):
                await self._settle(session, job, None, None)
                spend.stopped.append(job.id)
