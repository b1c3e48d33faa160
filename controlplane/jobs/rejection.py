"""Rejection: a queued job that no registered host could ever run ends REJECTED, its hold
released (the scheduler decides which, scheduler/feasibility.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.jobs.billing import JobBilling
from controlplane.jobs.models import Job
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import JobState, set_job_state

log = logging.getLogger(__name__)


class Rejections(JobBilling):
    """Part of JobService: jobs no host could ever run."""

    async def reject_unsatisfiable(
        self, session: AsyncSession, rejections: Sequence[tuple[Job, str]], now: datetime
    ) -> None:
        """Inside the scheduling cycle's transaction (which holds the queued jobs' locks):
        each job is REJECTED with why, and its hold settled (what earlier attempts were
        charged stays posted, the rest is released)."""
        repo = JobRepository(session)
        for job, why in rejections:
            if set_job_state(repo, job, JobState.REJECTED, reason=why[:1000], now=now):
                await self._settle(session, job, None, None)
                log.info("job %s rejected: %s", job.id, why)
