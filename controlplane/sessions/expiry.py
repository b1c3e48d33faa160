"""Running sessions near their expiry: warned by an event, and stopped if their daemon did not."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.jobs.models import Job
from controlplane.jobs.outcomes import StopReason
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.service import JobService
from controlplane.jobs.states import JobState, note_job_event
from controlplane.sessions.service import ID_PREFIX, WARNING, expires_at, spec_of
from controlplane.sessions.settings import SessionSettings

log = logging.getLogger(__name__)
BATCH = 500


def warning_text(job_id: str, expiry: datetime, now: datetime) -> str:
    left = max(int((expiry - now).total_seconds()), 0)
    return (
        f"{WARNING}expires at {expiry.isoformat(timespec='seconds')} (in {left} s); "
        f"extend it with `gpuplane sessions extend {job_id} --hours H`"
    )


def warned_for(previous: str, expiry: datetime) -> bool:
    """Whether a warning (its text) was about this expiry (an extension moves it)."""
    return f"expires at {expiry.isoformat(timespec='seconds')} " in previous


class SessionExpiry:
    """On every replica, every `check_interval`: each running session within its warning
    lead of its expiry gets one warning event per expiry; one still running `overdue_grace`
    past it is stopped by the control plane (STOP_REASON_TIMED_OUT), its daemon having not.
    Each change is made under the job's row lock after checking again, so replicas agree."""

    def __init__(self, jobs: JobService, settings: SessionSettings) -> None:
        self.jobs = jobs
        self.settings = settings

    def lead(self, job: Job) -> timedelta:
        duration = spec_of(job).max_duration_seconds
        lead = min(self.settings.warn_lead_seconds, duration * self.settings.warn_fraction)
        return timedelta(seconds=lead)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_interval_seconds)
            await self.check_once()

    async def check_once(self) -> int:
        """One pass; returns how many sessions were warned or stopped."""
        now = utcnow()
        async with self.jobs.db.read() as session:
            repo = JobRepository(session)
            running = await repo.running_with_prefix(ID_PREFIX, BATCH)
            due = [j for j in running if (e := expires_at(j)) and now >= e - self.lead(j)]
            warned = await repo.latest_events_like([j.id for j in due], WARNING)
        acted = 0
        grace = timedelta(seconds=self.settings.overdue_grace_seconds)
        for job in due:
            expiry = expires_at(job)
            assert expiry is not None
            if now >= expiry + grace and not job.cancel_requested:
                acted += await self._stop(job.id, now)
            elif not warned_for(warned.get(job.id, ""), expiry):
                acted += await self._warn(job.id, now)
        return acted

    async def _warn(self, job_id: str, now: datetime) -> bool:
        async def work(session: AsyncSession) -> bool:
            repo = JobRepository(session)
            job = await repo.get(job_id, lock=True)
            expiry = expires_at(job) if job is not None else None
            if job is None or expiry is None or job.state != JobState.RUNNING.value:
                return False
            previous = await repo.latest_events_like([job_id], WARNING)
            if warned_for(previous.get(job_id, ""), expiry):
                return False
            note_job_event(repo, job, warning_text(job_id, expiry, now), now=now)
            return True

        warned = await self.jobs.db.run(work)
        if warned:
            log.info("session %s: expiry warning given", job_id)
            self.jobs.notifier.job_changed(job_id)
        return warned

    async def _stop(self, job_id: str, now: datetime) -> bool:
        async def work(session: AsyncSession) -> Job | None:
            repo = JobRepository(session)
            job = await repo.get(job_id, lock=True)
            if job is None or job.state != JobState.RUNNING.value or job.cancel_requested:
                return None
            job.cancel_requested = True
            job.state_reason = "session expired: stopped by the control plane"
            stop = self.jobs._cancel_command(job, StopReason.STOP_REASON_TIMED_OUT)
            await self.jobs._command(session, job, stop, now)
            return job

        job = await self.jobs.db.run(work)
        if job is None:
            return False
        log.warning("session %s is past its expiry: stopping it", job_id)
        self.jobs.streams.wake(job.host_id or "")
        return True
