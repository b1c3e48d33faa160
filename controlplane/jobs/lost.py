"""Lost attempts: requeued (or the job ends), never charged (metered charges refunded)."""

from __future__ import annotations

from datetime import datetime, timedelta

from gpuplane.v1 import types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.jobs.billing import JobBilling
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.policy import hold_expiry
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import AttemptState, JobState, set_attempt_state, set_job_state
from controlplane.ledger.repository import LedgerRepository
from controlplane.registry.repository import RegistryRepository


class LostAttempts(JobBilling):
    """Part of JobService: attempts lost to a provider fault."""

    async def sweep_lost_attempts(self) -> list[str]:
        """Requeues (or fails) lost attempts (host lost, dispatch never taken); the consumer
        pays nothing for them."""
        now = utcnow()
        touched: list[str] = []
        async with self.db.transaction() as session:
            repo = JobRepository(session)
            for attempt, why in await repo.lost_attempts(now - self.policy.dispatch_ack_timeout):
                job = await repo.get(attempt.job_id, lock=True)
                if job is None:
                    continue
                await self._lose_attempt(session, repo, job, attempt, why, now)
                touched.append(job.id)
        for job_id in touched:
            self.notifier.job_changed(job_id)
        if touched:
            self.notifier.schedule.set()
        return touched

    async def _lose_attempt(
        self,
        session: AsyncSession,
        repo: JobRepository,
        job: Job,
        attempt: JobAttempt,
        why: str,
        now: datetime,
    ) -> None:
        """Ends an attempt lost to a provider fault: never charged (what metering charged is
        refunded into the hold), GPUs freed, job retried."""
        set_attempt_state(attempt, AttemptState.LOST, reason=why, now=now)
        registry = RegistryRepository(session)
        await registry.release_gpus(job.id, attempt.attempt)
        host = await registry.get_host(attempt.host_id)
        if host is not None:
            host.lost_attempts += 1
        hold = await LedgerRepository(session).hold_of_job(job.id)
        if hold is not None:
            # What metering charged for this attempt goes back into the hold.
            key = f"job/{job.id}/{attempt.attempt}/provider-fault"
            refunded = await self.ledger.refund_attempt(session, hold.id, attempt.attempt, key)
            attempt.charged -= refunded
            job.charged -= refunded
        if job.attempt == attempt.attempt and not JobState(job.state).terminal:
            await self._requeue_or_fail(session, repo, job, now, why)

    async def _requeue_or_fail(
        self, session: AsyncSession, repo: JobRepository, job: Job, now: datetime, why: str
    ) -> None:
        if job.cancel_requested:
            set_job_state(repo, job, JobState.CANCELLED, reason=job.state_reason, now=now)
        elif job.attempt <= job.max_retries:
            set_job_state(
                repo,
                job,
                JobState.QUEUED,
                reason=f"attempt {job.attempt} lost: {why}; retrying",
                now=now,
            )
            backoff = self.policy.retry_backoff * (2 ** (job.attempt - 1))
            job.attempt += 1
            job.host_id = None
            job.gpu_uuids = []
            job.not_before = now + min(backoff, timedelta(minutes=5))
            hold = await LedgerRepository(session).hold_of_job(job.id)
            if hold is not None:
                spec = types_pb2.JobSpec.FromString(job.spec)
                await self.ledger.extend(session, hold.id, hold_expiry(spec, self.policy, now))
            return
        else:
            set_job_state(
                repo,
                job,
                JobState.FAILED,
                reason=f"attempt {job.attempt} lost: {why}; no retries left",
                now=now,
            )
        await self._settle(session, job, None, None)
