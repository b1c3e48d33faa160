"""Hold expiry: a job without an outcome when its hold expires fails or is asked to stop."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.jobs.billing import JobBilling, StopReason
from controlplane.jobs.models import Job
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import ON_HOST, JobState, set_job_state
from controlplane.ledger.models import HoldState
from controlplane.ledger.repository import LedgerRepository

log = logging.getLogger(__name__)


class HoldExpiry(JobBilling):
    """Part of JobService: holds that expire before their job has an outcome."""

    async def expire_holds(self, limit: int = 100) -> list[str]:
        """Resolves pending holds past their expiry (EXPIRED: the rest released). A queued
        job whose hold expires fails ("hold_expired"); a job still on a host is asked to stop
        and its hold settles when it reports; a hold without a job simply expires. Returns
        the ids of the holds expired."""
        now = utcnow()
        async with self.db.read() as session:
            due = await LedgerRepository(session).due_holds(now, limit)
        expired: list[str] = []
        for hold_id, job_id in due:

            async def work(
                session: AsyncSession, hold_id: str = hold_id, job_id: str | None = job_id
            ) -> tuple[bool, Job | None, bool]:
                repo = JobRepository(session)
                job = await repo.get(job_id, lock=True) if job_id else None
                if job is not None and JobState(job.state) in ON_HOST:
                    job.cancel_requested = True
                    job.state_reason = "cancel requested: hold expired"
                    stop = self._cancel_command(job, StopReason.STOP_REASON_HOLD_EXPIRED)
                    await self._command(session, job, stop, now)
                    return False, job, True
                if job is not None and job.state == JobState.QUEUED.value:
                    why = "hold_expired: not placed before the job's hold expired"
                    set_job_state(repo, job, JobState.FAILED, reason=why, now=now)
                release = f"job/{job_id}/release" if job_id else f"hold/{hold_id}/release"
                resolution = await self.ledger.settle(
                    session,
                    hold_id,
                    cost=None,
                    key=f"hold/{hold_id}/expired",
                    release_key=release,
                    outcome=HoldState.EXPIRED,
                )
                if job is not None and not resolution.replay:
                    job.charged = resolution.posted
                return not resolution.replay, job, False

            done, job, commanded = await self.db.run(work)
            if commanded and job is not None:
                self.streams.wake(job.host_id or "")
            if done:
                expired.append(hold_id)
                log.warning("hold %s expired (job %s)", hold_id, job_id or "-")
            if job is not None:
                self.notifier.job_changed(job.id)
        return expired
