"""Retries: lost attempts (never charged, metered charges refunded) and failures the spec
retries are requeued as the next attempt, or the job ends with every attempt's cause."""

from __future__ import annotations

from collections.abc import Sequence
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
from controlplane.registry.reliability import note_outcome
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
            self.notifier.gpus_changed(freed=True)
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
        host = await registry.get_host(attempt.host_id, lock=True)  # concurrent reports count too
        if host is not None:
            host.lost_attempts += 1
            note_outcome(host, False, now)
        hold = await LedgerRepository(session).hold_of_job(job.id)
        if hold is not None:
            # What metering charged for this attempt goes back into the hold.
            key = f"job/{job.id}/{attempt.attempt}/provider-fault"
            refunded = await self.ledger.refund_attempt(session, hold.id, attempt.attempt, key)
            attempt.charged -= refunded
            job.charged -= refunded
        if job.attempt == attempt.attempt and not JobState(job.state).terminal:
            await self._requeue_or_fail(session, repo, job, now, f"lost: {why}")

    async def _retry_failed_attempt(
        self,
        session: AsyncSession,
        repo: JobRepository,
        job: Job,
        attempt: JobAttempt,
        text: str,
        exit_code: int,
        now: datetime,
    ) -> None:
        """Ends an attempt that failed with an exit code the spec retries: it is charged
        like any attempt that ran (its final cost, without settling the hold), its GPUs are
        freed and the job is requeued, or fails when no retries are left."""
        attempt.exit_code = exit_code
        set_attempt_state(attempt, AttemptState.FAILED, reason=text, now=now)
        registry = RegistryRepository(session)
        await registry.release_gpus(job.id, attempt.attempt)
        provider = await registry.count_completed_attempt(attempt.host_id)
        hold = await LedgerRepository(session).hold_of_job(job.id)
        if provider is not None:
            await registry.note_outcomes([(attempt.host_id, True)], now)
            if hold is not None:
                cost = await self._cost(session, job, attempt, provider)
                key = f"job/{job.id}/{attempt.attempt}/final"
                charged = await self.ledger.charge(session, hold.id, cost, key)
                attempt.charged += charged.amount
                job.charged += charged.amount
        await self._requeue_or_fail(session, repo, job, now, f"failed: {text}", exit_code)

    async def _requeue_or_fail(
        self,
        session: AsyncSession,
        repo: JobRepository,
        job: Job,
        now: datetime,
        why: str,
        exit_code: int | None = None,
    ) -> None:
        """After attempt `job.attempt` ended for `why` (a provider fault, or a user failure
        the spec retries): the job is cancelled if that was asked, requeued as the next
        attempt while max_retries allows (the host of a lost attempt is avoided), else it
        fails with the cause of every attempt and its hold is settled."""
        if job.cancel_requested:
            set_job_state(repo, job, JobState.CANCELLED, reason=job.state_reason, now=now)
        elif job.attempt <= job.max_retries:
            set_job_state(
                repo,
                job,
                JobState.QUEUED,
                reason=f"attempt {job.attempt} {why}; retrying",
                exit_code=exit_code,
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
            causes = attempt_causes(await repo.attempts(job.id))
            reason = f"attempt {job.attempt} {why}; no retries left ({causes})"
            set_job_state(
                repo, job, JobState.FAILED, reason=reason[:1000], exit_code=exit_code, now=now
            )
        await self._settle(session, job, None, None)


def attempt_causes(attempts: Sequence[JobAttempt]) -> str:
    """Why each attempt ended, for the reason of a job that failed after retries:
    "attempt 1 on host-a: host lost (no heartbeat); attempt 2 on host-b: exit code 3"."""
    return "; ".join(f"attempt {a.attempt} on {a.host_id}: {a.reason or a.state}" for a in attempts)
