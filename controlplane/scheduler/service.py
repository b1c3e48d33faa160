"""First-fit scheduling: places queued jobs on free GPUs; each placement commits together
with its dispatch message in the outbox, so a placement is never published without its row
nor committed without its message."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import messaging_pb2, types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import Conflict
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.notify import Notifier
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.service import transition
from controlplane.jobs.states import JobState
from controlplane.outbox.repository import OutboxRepository
from controlplane.registry.repository import RegistryRepository
from controlplane.scheduler.capacity import SCHEDULABLE_HOST_STATES, capacity_snapshot
from controlplane.scheduler.matching import HostCapacity, explain, first_fit
from messaging.subjects import dispatch_msg_id, dispatch_subject
from storage.layout import attempt_prefix

__all__ = ["SCHEDULABLE_HOST_STATES", "Scheduler", "capacity_snapshot"]

log = logging.getLogger(__name__)

# Time a placed attempt may wait for its daemon before it counts as lost.
DISPATCH_GRACE = timedelta(minutes=10)

# Called inside every placement transaction before anything is written: raises (a domain
# error) when this process may no longer place jobs (a stale scheduling leader), so the
# transaction rolls back and nothing is committed.
Fence = Callable[[AsyncSession], Awaitable[None]]


class Scheduler:
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        bucket: str,
        batch: int = 200,
        fence: Fence | None = None,
    ) -> None:
        self.db = db
        self.notifier = notifier
        self.bucket = bucket
        self.batch = batch
        self.fence = fence

    async def run_once(self) -> int:
        """One scheduling cycle; returns how many jobs were placed."""
        now = utcnow()
        placed: list[str] = []
        async with self.db.transaction() as session:
            if self.fence is not None:
                await self.fence(session)
            repo = JobRepository(session)
            jobs = await repo.queued(now, self.batch)
            if not jobs:
                return 0
            hosts = await capacity_snapshot(session)
            registry = RegistryRepository(session)
            outbox = OutboxRepository(session)
            for job in jobs:
                spec = types_pb2.JobSpec.FromString(job.spec)
                decision = first_fit(spec, hosts, spec.allow_simulated)
                if decision.placement is None:
                    job.state_reason = explain(spec, decision)
                    continue
                host, gpus = decision.placement.host, decision.placement.gpus
                uuids = [g.uuid for g in gpus]
                if await registry.allocate_gpus(uuids, job.id, job.attempt) != len(uuids):
                    # Another writer took a GPU since the snapshot: roll the whole cycle back.
                    raise Conflict("GPU allocation raced; retrying the cycle")
                host.free = [g for g in host.free if g.uuid not in set(uuids)]
                self._place(repo, outbox, job, spec, host, uuids, now)
                placed.append(job.id)
        for job_id in placed:
            self.notifier.job_changed(job_id)
        if placed:
            self.notifier.outbox.set()
            log.info("placed %d job(s)", len(placed))
        return len(placed)

    def _place(
        self,
        repo: JobRepository,
        outbox: OutboxRepository,
        job: Job,
        spec: types_pb2.JobSpec,
        host: HostCapacity,
        uuids: list[str],
        now: datetime,
    ) -> None:
        job.host_id = host.host_id
        job.gpu_uuids = uuids
        job.price_per_gpu_hour = host.price_per_gpu_hour
        transition(repo, job, JobState.SCHEDULED, reason=f"placed on {host.host_id}", now=now)
        repo.add(
            JobAttempt(
                job_id=job.id,
                attempt=job.attempt,
                host_id=host.host_id,
                gpu_uuids=uuids,
                state=JobState.SCHEDULED.value,
                reason="",
                live=True,
                lost=False,
                report_seq=0,
                run_time_ms=0,
                charged=0,
                manifest=[],
                created_at=now,
            )
        )
        deadline = Timestamp()
        deadline.FromDatetime(now + DISPATCH_GRACE + timedelta(seconds=spec.max_duration_seconds))
        message = messaging_pb2.DispatchMessage(
            job_id=job.id,
            attempt=job.attempt,
            tenant_id=job.tenant_id,
            spec=spec,
            gpu_uuids=uuids,
            results_prefix=attempt_prefix(job.id, job.attempt),
            bucket=self.bucket,
            deadline=deadline,
        )
        outbox.enqueue(
            dispatch_subject(host.host_id),
            dispatch_msg_id(job.id, job.attempt),
            message.SerializeToString(),
            now,
        )
