"""Budgets stop on time: the run time a budget pays for, and the control plane's own stop of
attempts whose daemon ran past it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from gpuplane.v1 import types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.jobs.billing import JobBilling, StopReason
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import AttemptState, JobState
from controlplane.ledger.transfers import MS_PER_HOUR

log = logging.getLogger(__name__)
# A budget's run time is at most this (int64 columns, uint64 on the wire): 146,000 years.
MAX_BUDGET_MS = 2**62


@dataclass(frozen=True, slots=True)
class AttemptBudget:
    """What is left of a job's budget for one attempt, and the run time it pays for."""

    amount: int
    run_ms: int


def budget_run_ms(amount: int, price_per_gpu_hour: int, gpus: int) -> int:
    """The run time `amount` micro-credits pay for at `price_per_gpu_hour` × `gpus`:
    floor(amount × 3,600,000 / (price × GPUs)), so that its charge
    (`ledger.charge_for`, which rounds up) never exceeds `amount`; at least 1 ms (a spent
    budget stops the attempt at once), at most MAX_BUDGET_MS."""
    rate = max(price_per_gpu_hour, 1) * max(gpus, 1)
    return min(max(amount, 0) * MS_PER_HOUR // rate, MAX_BUDGET_MS) or 1


def attempt_budget(
    spec: types_pb2.JobSpec, charged_before: int, price_per_gpu_hour: int, gpus: int
) -> AttemptBudget | None:
    """The budget of an attempt placed at `price_per_gpu_hour` on `gpus` GPUs: the spec's
    budget less what the job's earlier attempts were charged (`charged_before`; lost ones
    were refunded). None without a budget."""
    if not spec.budget_micro_credits:
        return None
    amount = max(spec.budget_micro_credits - charged_before, 0)
    return AttemptBudget(amount, budget_run_ms(amount, price_per_gpu_hour, gpus))


class BudgetStops(JobBilling):
    """Part of JobService: the control plane's own budget deadline, independent of daemons."""

    async def sweep_over_budget(self, limit: int = 1000) -> list[str]:
        """Asks the host of every running attempt past its budget deadline (the control
        plane's start of its run + its budget's run time + the policy's grace) to stop it
        with STOP_REASON_BUDGET_EXHAUSTED, and again every `budget_stop_resend` until it
        ends; its charge never exceeds its budget whatever its daemon reports. Any replica
        may sweep: the stop is a stored command (controlplane/commands) that the replica
        holding the host's stream delivers, and the attempt's lock lets one replica ask per
        resend period. Returns the ids of the jobs asked."""
        now = utcnow()
        cutoff = now - self.policy.budget_stop_grace
        async with self.db.read() as session:
            due = await JobRepository(session).over_budget(cutoff, limit)
        sent: list[str] = []
        for job_id, number, host_id in due:

            async def work(
                session: AsyncSession, job_id: str = job_id, number: int = number
            ) -> bool:
                return await self._budget_stop(session, job_id, number, cutoff, now)

            if await self.db.run(work):
                log.warning("job %s/%s ran past its budget: stopping it", job_id, number)
                self.streams.wake(host_id)
                sent.append(job_id)
        return sent

    async def _budget_stop(
        self, session: AsyncSession, job_id: str, number: int, cutoff: datetime, now: datetime
    ) -> bool:
        """Under the job's and the attempt's locks (the order reports take them): still
        running past the deadline? Then the stop is stored for its host and the next
        resend's time set."""
        repo = JobRepository(session)
        job = await repo.get(job_id, lock=True)
        attempt = await repo.attempt(job_id, number, lock=True)
        if job is None or attempt is None or attempt.budget_stop_at is None:
            return False
        if attempt.budget_stop_at > cutoff or attempt.state != AttemptState.RUNNING.value:
            return False
        attempt.budget_stop_at = now + self.policy.budget_stop_resend
        if job.attempt != attempt.attempt or job.state != JobState.RUNNING.value:
            return False
        command = self._cancel_command(job, StopReason.STOP_REASON_BUDGET_EXHAUSTED)
        await self._command(session, job, command, now)
        return True
