"""Running replicas' leases: extended, their holds topped up, while the owner's credit lasts."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING

from gpuplane.v1 import registry_pb2, types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.errors import FailedPrecondition
from controlplane.jobs.models import Job
from controlplane.jobs.policy import hold_for
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import JobState, note_job_event
from controlplane.ledger import service as ledger
from controlplane.ledger.repository import LedgerRepository
from controlplane.services.models import Service
from controlplane.services.repository import ServiceRepository
from controlplane.services.states import note_service_event

if TYPE_CHECKING:
    from controlplane.services.service import ServiceService

log = logging.getLogger(__name__)
WARNING = "credit warning: "


class LeaseKeeper:
    """A replica runs for a lease (its spec's max_duration_seconds, enforced by its daemon
    as a moving deadline); `service_lease_renew_lead_seconds` before it runs out, the lease
    is extended by `service_lease_seconds`: the job's hold topped up by their price and its
    daemon told (ExtendCommand), as a session's extension. When the credit or the spending
    limit cannot pay, the service gets a warning event (once per lease) and the replica
    ends at its lease's end; the reconciler then stops the service (`unpaid`)."""

    def __init__(self, services: ServiceService) -> None:
        self.services = services
        self.jobs = services.jobs
        self.settings = services.settings
        # Replicas whose extension was refused, and the lease it was refused for.
        self._unpaid: dict[str, int] = {}

    def unpaid(self, job_id: str) -> bool:
        return self._unpaid.pop(job_id, None) is not None

    async def keep(self, service: Service, job: Job) -> None:
        """Extends `job`'s lease if it is due (a refusal: a warning, and `unpaid`)."""
        spec = types_pb2.JobSpec.FromString(job.spec)
        if job.started_at is None or job.cancel_requested:
            return
        ends = job.started_at + timedelta(seconds=spec.max_duration_seconds)
        if ends - utcnow() > timedelta(seconds=self.settings.lease_renew_lead_seconds):
            return
        if self._unpaid.get(job.id) == spec.max_duration_seconds:
            return  # refused for this lease already: it ends with it
        try:
            await self.jobs.db.run(lambda session: self._extend(session, service.id, job.id))
        except FailedPrecondition as refused:
            self._unpaid[job.id] = spec.max_duration_seconds
            await self._warn(service.id, job.id, refused.message)
        if job.host_id:
            self.jobs.streams.wake(job.host_id)

    async def _extend(self, session: AsyncSession, service_id: str, job_id: str) -> None:
        repo = JobRepository(session)
        job = await repo.get(job_id, lock=True)
        if job is None or job.state != JobState.RUNNING.value or job.cancel_requested:
            return
        spec = types_pb2.JobSpec.FromString(job.spec)
        seconds = int(self.settings.lease_seconds)
        longer = types_pb2.JobSpec()
        longer.CopyFrom(spec)
        longer.max_duration_seconds += seconds
        more = max(hold_for(longer, self.jobs.policy.default_max_price) - job.hold_amount, 0)
        hold = await LedgerRepository(session).hold_of_job(job.id)
        if hold is None:
            raise FailedPrecondition(f"replica {job.id} holds no credit")
        key = f"job/{job.id}/lease/{longer.max_duration_seconds}"
        expiry = hold.expires_at + timedelta(seconds=seconds)
        try:
            await self.jobs.ledger.top_up(session, hold.id, more, key, expiry)
        except ledger.SpendingLimitExceeded as refused:
            raise FailedPrecondition(f"spending limit: {refused.message}") from None
        except FailedPrecondition:
            raise FailedPrecondition(
                f"insufficient credit: extending replica {job.id} by {seconds} s needs "
                f"{ledger.format_credits(more)} credits more"
            ) from None
        job.spec = longer.SerializeToString(deterministic=True)
        job.hold_amount += more
        now = utcnow()
        total = longer.max_duration_seconds
        note_job_event(repo, job, f"lease extended by {seconds} s to {total} s", now=now)
        extend = registry_pb2.ExtendCommand(
            job_id=job.id, attempt=job.attempt, max_duration_seconds=total
        )
        await self.jobs._command(session, job, registry_pb2.ControlMessage(extend=extend), now)

    async def _warn(self, service_id: str, job_id: str, why: str) -> None:
        async def work(session: AsyncSession) -> None:
            repo = ServiceRepository(session)
            service = await repo.get(service_id, lock=True)
            if service is not None:
                text = f"{WARNING}{why}; replica {job_id} stops at the end of its lease"
                note_service_event(repo, service, text, utcnow())

        await self.jobs.db.run(work)
        log.warning("service %s: replica %s lease not extended: %s", service_id, job_id, why)
