"""The leader's loop that keeps every active service's replicas at its desired count."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from gpuplane.v1 import messaging_pb2, types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal, Role
from controlplane.db.base import utcnow
from controlplane.errors import DomainError, FailedPrecondition, NotFound
from controlplane.jobs.models import Job
from controlplane.jobs.states import JobState
from controlplane.ledger.transfers import scoped_key
from controlplane.scheduler.leader import Leadership
from controlplane.services.lease import LeaseKeeper
from controlplane.services.models import Service, ServiceReplica
from controlplane.services.repository import ServiceRepository
from controlplane.services.service import REPLICA_PREFIX, ServiceService, spec_of
from controlplane.services.states import ServiceState, note_service_event, set_service_state

log = logging.getLogger(__name__)
StopReason = messaging_pb2.StopReason
BATCH = 500
# A replica still queued this long after its launch no longer holds the next one back (the
# next is launched knowing where the placed ones run, to spread them).
SPREAD_WAIT = timedelta(seconds=5)
CREDIT = "credit exhausted"


def owner(service: Service) -> Principal:
    """The principal the reconciler acts as for the service: its tenant's consumer."""
    return Principal(service.tenant_id, Role.CONSUMER, "service-reconciler")


def describe_end(job: Job) -> str:
    state = JobState(job.state)
    exit_code = f", exit code {job.exit_code}" if job.exit_code is not None else ""
    return f"replica {job.id} ended {state.value}{exit_code}: {job.state_reason}"[:1000]


@dataclass
class Plan:
    """What one pass decided for a service, under its row lock, for the work after it."""

    service: Service
    retire: list[str] = field(default_factory=list)
    launch: int = 0
    running: list[Job] = field(default_factory=list)
    stop_for_credit: str = ""


class Reconciler:
    """Looks at each active service (and any with a replica whose end was not looked at)
    every interval, or at once when a service changed: settles ended replicas (a failure
    backs off exponentially, capped; a healthy period resets it), stops extras and the
    replicas of stopped services, launches missing ones spread over hosts, and extends
    running replicas' leases (LeaseKeeper). Leader-only: one process decides."""

    def __init__(self, services: ServiceService, leader: Leadership) -> None:
        self.services = services
        self.jobs = services.jobs
        self.settings = services.settings
        self.leader = leader
        self.leases = LeaseKeeper(services)

    async def run(self) -> None:
        while True:
            if not self.leader.leading:
                await self.leader.wait_leading()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.reconcile_interval_seconds):
                    await self.services.changed.wait()
            self.services.changed.clear()
            if self.leader.leading:
                await self.reconcile_once()

    async def reconcile_once(self) -> int:
        """One pass over the services that may need work; returns how many were looked at."""
        async with self.jobs.db.read() as session:
            ids = await ServiceRepository(session).to_reconcile(BATCH)
        for service_id in ids:
            try:
                await self.reconcile(service_id)
            except DomainError as error:
                log.warning("service %s: reconcile failed: %s", service_id, error.message)
        return len(ids)

    async def reconcile(self, service_id: str) -> None:
        plan = await self.jobs.db.run(lambda session: self._plan(session, service_id))
        if plan is None:
            return
        service = plan.service
        for job_id in plan.retire:
            await self._retire(service, job_id)
        if plan.stop_for_credit:
            await self._stop(service.id, plan.stop_for_credit)
            return
        for _ in range(plan.launch):
            if not await self._launch(service.id):
                break
        for job in plan.running:
            await self.leases.keep(service, job)

    async def _plan(self, session: AsyncSession, service_id: str) -> Plan | None:
        repo = ServiceRepository(session)
        service = await repo.get(service_id, lock=True)
        if service is None:
            return None
        now = utcnow()
        plan = Plan(service)
        rows = [(r, j) for r, j in await repo.replicas([service_id]) if not r.settled]
        for replica, job in rows:
            if JobState(job.state).terminal:
                self._settle(repo, service, replica, job, now, plan)
        live = [(r, j) for r, j in rows if not JobState(j.state).terminal]
        self._reset_if_healthy(repo, service, [j for _, j in live], now)
        kept = [(r, j) for r, j in live if not r.retired]
        if service.state != ServiceState.ACTIVE.value:
            extra = kept
        else:
            # Extras go newest first, queued ones before placed ones.
            order = sorted(kept, key=lambda rj: (rj[1].state != "queued", rj[1].created_at))
            extra = order[: max(len(kept) - service.desired_replicas, 0)]
        for replica, job in extra:
            replica.retired = True
            plan.retire.append(job.id)
        if extra:
            why = "stopped" if service.state != ServiceState.ACTIVE.value else "scaled down"
            ids = ", ".join(j.id for _, j in extra)
            note_service_event(repo, service, f"{why}: stopping replica(s) {ids}", now)
        plan.running = [j for r, j in kept if not r.retired and j.state == JobState.RUNNING.value]
        if service.state == ServiceState.ACTIVE.value and not plan.stop_for_credit:
            plan.launch = self._missing(service, [j for r, j in kept if not r.retired], now)
        return plan

    def _settle(
        self,
        repo: ServiceRepository,
        service: Service,
        replica: ServiceReplica,
        job: Job,
        now: datetime,
        plan: Plan,
    ) -> None:
        """An ended replica: no failure when the service stopped it; otherwise counted, the
        next replacement backed off, and the service stopped if its lease went unpaid."""
        replica.settled = True
        if replica.retired:
            return
        what = describe_end(job)
        if self.leases.unpaid(job.id):
            plan.stop_for_credit = f"{CREDIT}: {what} (its lease could not be extended)"
            return
        ran = (job.finished_at or now) - (job.started_at or now)
        if ran.total_seconds() >= self.settings.healthy_reset_seconds:
            service.failures = 0
        service.failures += 1
        service.restarts += 1
        service.last_failure = what
        delay = min(
            self.settings.backoff_base_seconds * 2 ** (service.failures - 1),
            self.settings.backoff_max_seconds,
        )
        service.backoff_until = now + timedelta(seconds=delay)
        note_service_event(repo, service, f"{what}; replacing it in {delay:.1f} s", now)

    def _reset_if_healthy(
        self, repo: ServiceRepository, service: Service, live: list[Job], now: datetime
    ) -> None:
        healthy = timedelta(seconds=self.settings.healthy_reset_seconds)
        if service.failures and any(
            j.state == JobState.RUNNING.value and j.started_at and now - j.started_at >= healthy
            for j in live
        ):
            service.failures, service.backoff_until = 0, None
            note_service_event(repo, service, "a replica ran healthy: backoff reset", now)

    def _missing(self, service: Service, kept: list[Job], now: datetime) -> int:
        """How many replicas to launch now: none while backing off; one at a time, the next
        once the last is placed (so it knows where that went), unless one waits unplaced past
        SPREAD_WAIT (then every missing one: spreading is a preference, not a condition)."""
        missing = service.desired_replicas - len(kept)
        if missing <= 0 or (service.backoff_until is not None and now < service.backoff_until):
            return 0
        queued = [j for j in kept if j.state == JobState.QUEUED.value]
        if any(now - j.created_at < SPREAD_WAIT for j in queued):
            return 0
        return missing if queued else 1

    async def _retire(self, service: Service, job_id: str) -> None:
        why = f"service {service.name}: replica no longer wanted"
        try:
            await self.jobs.cancel(
                owner(service), job_id, "", StopReason.STOP_REASON_SERVICE_SCALED_DOWN, why
            )
        except NotFound:
            log.warning("service %s: replica %s is gone", service.id, job_id)

    async def _stop(self, service_id: str, why: str) -> None:
        async def work(session: AsyncSession) -> None:
            repo = ServiceRepository(session)
            service = await repo.get(service_id, lock=True)
            if service is not None:
                service.last_failure = why[:1000]
                set_service_state(repo, service, ServiceState.STOPPED, why, utcnow())

        await self.jobs.db.run(work)
        log.warning("service %s stopped: %s", service_id, why)
        self.services.touched(service_id)

    async def _launch(self, service_id: str) -> bool:
        """Submits one replica as a job of the service's owner, spread away from the hosts
        its other replicas run on (and the host of the latest that failed) when another host
        could take it; False when refused."""
        prepared = await self.jobs.db.run(lambda s: self._launch_spec(s, service_id))
        if prepared is None:
            return False
        service, spec, number = prepared
        key = scoped_key("service", service_id, number)
        try:
            job = await self.jobs.submit(owner(service), spec, key, service_id, kind=REPLICA_PREFIX)
        except DomainError as error:
            await self._refused(service_id, error)
            return False
        await self.jobs.db.run(lambda s: self._record(s, service_id, job, number))
        return True

    async def _launch_spec(
        self, session: AsyncSession, service_id: str
    ) -> tuple[Service, types_pb2.JobSpec, int] | None:
        repo = ServiceRepository(session)
        service = await repo.get(service_id)
        if service is None or service.state != ServiceState.ACTIVE.value:
            return None
        spec = spec_of(service)
        rows = await repo.replicas([service_id])
        busy = {j.host_id for r, j in rows if j.host_id and not JobState(j.state).terminal}
        # The host of the latest replica that failed (rows are newest first), avoided too.
        failed = [j.host_id for r, j in rows if r.settled and not r.retired and j.host_id]
        could = await repo.hosts_with_free_gpus(spec.gpu_count) - set(spec.exclude_host_ids)
        for avoid in (busy | set(failed[:1]), busy):
            if avoid and could - avoid:
                spec.exclude_host_ids.extend(sorted(avoid - set(spec.exclude_host_ids)))
                break
        return service, spec, service.launched

    async def _record(self, session: AsyncSession, service_id: str, job: Job, number: int) -> None:
        repo = ServiceRepository(session)
        service = await repo.get(service_id, lock=True)
        if service is None or await repo.replica(job.id) is not None:
            return
        now = utcnow()
        repo.add(ServiceReplica(job_id=job.id, service_id=service_id, created_at=now))
        service.launched = max(service.launched, number + 1)
        note_service_event(repo, service, f"replica {job.id} launched", now)

    async def _refused(self, service_id: str, error: DomainError) -> None:
        """A replica the jobs refused: no credit stops the service; anything else backs off."""
        message = error.message
        if isinstance(error, FailedPrecondition) and "credit" in message:
            await self._stop(service_id, f"{CREDIT}: cannot start a replica: {message}")
            return

        async def work(session: AsyncSession) -> None:
            repo = ServiceRepository(session)
            service = await repo.get(service_id, lock=True)
            if service is None:
                return
            now = utcnow()
            service.failures += 1
            delay = min(
                self.settings.backoff_base_seconds * 2 ** (service.failures - 1),
                self.settings.backoff_max_seconds,
            )
            service.backoff_until = now + timedelta(seconds=delay)
            service.last_failure = f"cannot start a replica: {message}"[:1000]
            note_service_event(repo, service, f"{service.last_failure}; retrying in {delay} s", now)

        await self.jobs.db.run(work)
