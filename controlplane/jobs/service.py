"""Job lifecycle: submit (with its hold), read, cancel. JobService also applies daemon
reports (reports.py), retries attempts (lost.py), expires holds (expiry.py), rejects
jobs no host could ever run (rejection.py) and stops jobs at their tenant's monthly spending
limit (spending.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from gpuplane.v1 import registry_pb2, types_pb2
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.data.service import stamp_input_hashes
from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.db.prefix import validate_id_prefix
from controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from controlplane.idempotency import ensure_same
from controlplane.jobs.acks import CommandAcks
from controlplane.jobs.budget import BudgetStops
from controlplane.jobs.expiry import HoldExpiry
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.jobs.outcomes import Reason, StopReason
from controlplane.jobs.policy import JobPolicy as JobPolicy  # re-exported
from controlplane.jobs.policy import hold_expiry, hold_for, priced
from controlplane.jobs.reconcile import PeriodicResync
from controlplane.jobs.rejection import Rejections
from controlplane.jobs.reports import Reports
from controlplane.jobs.repository import JobRepository, NewRows
from controlplane.jobs.spec import DEFAULT_MAX_RETRIES, validate_labels, validate_spec
from controlplane.jobs.spending import SpendingLimits
from controlplane.jobs.states import ON_HOST, JobState, new_job, set_job_state
from controlplane.ledger import service as ledger
from controlplane.paging import Page, PageRequest

log = logging.getLogger(__name__)


@dataclass
class JobView:
    job: Job
    attempts: Sequence[JobAttempt]


class JobService(
    Reports, HoldExpiry, Rejections, BudgetStops, CommandAcks, SpendingLimits, PeriodicResync
):
    """The jobs domain's entry point: servicers, the report consumer and the background
    loops call it. Its parts live beside it: billing.py (metering, settlement), reports.py,
    lost.py, expiry.py, rejection.py, budget.py, spending.py, acks.py (daemons' answers to
    commands) and reconcile.py (heartbeats against live attempts)."""

    # Submit, read, cancel -----------------------------------------------------------------

    def prepare_spec(self, spec: types_pb2.JobSpec) -> types_pb2.JobSpec:
        """Validates and normalises a spec (defaults filled in) before it is stored."""
        validate_spec(spec)
        normalised = types_pb2.JobSpec()
        normalised.CopyFrom(spec)
        if normalised.network == types_pb2.NETWORK_MODE_UNSPECIFIED:
            normalised.network = types_pb2.NETWORK_MODE_NONE
        if self.policy.allow_simulated_by_default:
            normalised.allow_simulated = True
        if self.policy.allow_unverified_by_default:
            normalised.allow_unverified = True
        if not normalised.HasField("max_retries"):
            normalised.max_retries = DEFAULT_MAX_RETRIES
        return normalised

    async def price_spec(self, spec: types_pb2.JobSpec) -> types_pb2.JobSpec:
        """A prepared spec with the price its hold assumes as its max price: the dearest
        offer matching it now (policy.priced)."""
        return (await self._priced(spec))[0]

    async def _priced(self, spec: types_pb2.JobSpec) -> tuple[types_pb2.JobSpec, bool]:
        """price_spec, and whether some host could take the job now (True when unknown)."""
        if spec.budget_micro_credits:
            return spec, True
        if self.prices is None:
            return priced(spec, None, self.policy.default_max_price), True
        dearest = await self.prices.dearest_match(spec)
        return priced(spec, dearest, self.policy.default_max_price), dearest is not None

    async def submit(
        self,
        caller: Principal,
        spec: types_pb2.JobSpec,
        idempotency_key: str | None,
        request_hash: str,
        kind: str = "job",
    ) -> Job:
        """Validates, holds credit and queues the job in one transaction; `kind` is its id's
        prefix ("ses" for an interactive session, whose spec only SessionService makes; "rep"
        for a service's replica, made only by the service reconciler)."""
        if kind == "job" and spec.HasField("session"):
            raise InvalidArgument("spec.session", "sessions are created by CreateSession")
        if kind != "rep" and spec.HasField("service_replica"):
            raise InvalidArgument("spec.service_replica", "replicas are made by DeployService")
        spec, placeable = await self._priced(self.prepare_spec(spec))
        hold = hold_for(spec, self.policy.default_max_price)
        now = utcnow()

        async def work(session: AsyncSession) -> Job:
            repo = JobRepository(session)
            if idempotency_key:
                existing = await repo.by_idempotency_key(caller.tenant_id, idempotency_key)
                if existing is not None:
                    ensure_same(existing.request_hash, request_hash, idempotency_key)
                    return existing
            stamped = await stamp_input_hashes(session, caller.tenant_id, spec)
            rows = NewRows()
            job = new_job(
                rows,
                job_id=new_id(kind),
                tenant_id=caller.tenant_id,
                spec=stamped.SerializeToString(deterministic=True),
                gpu_count=spec.gpu_count,
                priority=spec.priority,
                max_retries=spec.max_retries,
                labels=dict(spec.labels),
                hold_amount=hold,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                now=now,
            )
            await repo.insert_new(rows)
            await self._hold(session, caller, spec, job, hold, now)
            return job

        try:
            job = await self.db.run(work)
        except IntegrityError:
            if not idempotency_key:
                raise
            existing = await self._stored_first(caller, idempotency_key)
            if existing is None:
                raise
            ensure_same(existing.request_hash, request_hash, idempotency_key)
            return existing
        if placeable:
            # A cycle now could place it. Else no host could take it yet (the market view is
            # at most FRESH_SECONDS old): the periodic cycle will once one can, and a burst of
            # such submits does not run a cycle over the whole queue per submit.
            self.notifier.schedule.set()
        return job

    async def _hold(
        self,
        session: AsyncSession,
        caller: Principal,
        spec: types_pb2.JobSpec,
        job: Job,
        hold: int,
        now: datetime,
    ) -> None:
        """Places the new job's hold; refused when the tenant's credit does not cover it."""
        try:
            await self.ledger.place_hold(
                session,
                tenant_id=caller.tenant_id,
                amount=hold,
                key=f"job/{job.id}/hold",
                expires_at=hold_expiry(spec, self.policy, now),
                job_id=job.id,
                fresh_key=True,  # the job's id was made in this transaction
            )
        except ledger.SpendingLimitExceeded as refused:
            raise FailedPrecondition(limit_refusal(refused.budget, hold)) from None
        except FailedPrecondition:
            raise FailedPrecondition(
                f"insufficient credit: the job needs a hold of "
                f"{ledger.format_credits(hold)} credits; deposit more or set a lower "
                "spec.budget_micro_credits, spec.max_duration_seconds or "
                "spec.max_price_per_gpu_hour_micro_credits"
            ) from None

    async def _stored_first(self, caller: Principal, idempotency_key: str) -> Job | None:
        """The job a concurrent submit with the same idempotency key stored first."""
        async with self.db.read() as session:
            return await JobRepository(session).by_idempotency_key(
                caller.tenant_id, idempotency_key
            )

    async def get(self, caller: Principal, job_id: str) -> JobView:
        async with self.db.read() as session:
            repo = JobRepository(session)
            job = await repo.get_readable(caller, job_id)
            if job is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            return JobView(job, await repo.attempts(job_id))

    async def list_jobs(
        self,
        caller: Principal,
        tenant_id: str,
        states: Sequence[JobState],
        labels: dict[str, str],
        created_after: datetime | None,
        created_before: datetime | None,
        page: PageRequest,
        id_prefix: str = "",
    ) -> Page[Job]:
        owner = None if caller.is_admin and not tenant_id else caller.require_tenant(tenant_id)
        validate_labels("labels", labels)
        if id_prefix:
            validate_id_prefix("id_prefix", id_prefix)
        async with self.db.read() as session:
            return await JobRepository(session).list(
                caller,
                owner,
                [s.value for s in states],
                created_after,
                created_before,
                labels,
                page,
                id_prefix,
            )

    async def cancel(
        self,
        caller: Principal,
        job_id: str,
        reason: str,
        stop: Reason = StopReason.STOP_REASON_CANCELLED,
        why: str = "",
    ) -> Job:
        """Stops the job (its host told `stop`, the reason it ends for: a cancel, or a
        session's "done"); a queued one ends CANCELLED at once. `why`: its state reason."""
        if len(reason) > 500:
            raise InvalidArgument("reason", "at most 500 characters")
        now = utcnow()

        async def work(session: AsyncSession) -> tuple[Job, bool]:
            repo = JobRepository(session)
            job = await repo.get_readable(caller, job_id, lock=True)
            if job is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            state = JobState(job.state)
            said = why or (f"cancelled: {reason}" if reason else "cancelled by the user")
            if state == JobState.QUEUED:
                set_job_state(repo, job, JobState.CANCELLED, reason=said, now=now)
                await self._settle(session, job, None, None)
            elif state in ON_HOST:
                job.cancel_requested = True
                # Kept until the daemon's STOPPED report: it becomes the CANCELLED reason.
                job.state_reason = said
                command = self._cancel_command(job, stop, text=said)
                await self._command(session, job, command, now)
                return job, True
            return job, False

        job, commanded = await self.db.run(work)
        if commanded:
            self.streams.wake(job.host_id or "")
        self.notifier.job_changed(job_id)
        return job

    async def events_after(
        self, caller: Principal, job_id: str, seq: int
    ) -> tuple[Job, Sequence[JobEvent]]:
        async with self.db.read() as session:
            repo = JobRepository(session)
            job = await repo.get_readable(caller, job_id)
            if job is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            return job, await repo.events_after(job_id, seq)

    async def events_since(self, job_id: str, seq: int) -> Sequence[JobEvent]:
        """The job's events after `seq`, for a caller events_after already let read it (a job
        is never deleted, nor does it change tenant): one statement, not two."""
        async with self.db.read() as session:
            return await JobRepository(session).events_after(job_id, seq)

    async def attempt_of(
        self, caller: Principal, job_id: str, attempt: int
    ) -> tuple[Job, JobAttempt | None]:
        """The job and one attempt (0 = the current one)."""
        async with self.db.read() as session:
            repo = JobRepository(session)
            job = await repo.get_readable(caller, job_id)
            if job is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            if attempt > job.attempt:
                raise NotFound(f"attempt: job {job_id} has no attempt {attempt}")
            return job, await repo.attempt(job_id, attempt or job.attempt)

    async def live_attempts(self, host_id: str) -> list[registry_pb2.RunningJob]:
        return await live_attempts_of(self.db, host_id)


def limit_refusal(budget: ledger.Budget, hold: int) -> str:
    """Why a hold past the tenant's monthly spending limit is refused, and what to do."""
    credits = ledger.format_credits
    return (
        f"spending limit: the job needs a hold of {credits(hold)} credits and this month "
        f"has {credits(budget.remaining)} of its {credits(budget.monthly_limit)}-credit limit "
        f"left ({credits(budget.spent)} spent, {credits(budget.committed)} held by other "
        "jobs); raise the limit (SetSpendingLimit), wait for running jobs to finish, or set "
        "a lower spec.budget_micro_credits, spec.max_duration_seconds or "
        "spec.max_price_per_gpu_hour_micro_credits"
    )


async def live_attempts_of(db: Database, host_id: str) -> list[registry_pb2.RunningJob]:
    """The attempts the control plane believes run on `host_id` (for HelloAck and resync)."""
    async with db.read() as session:
        rows = await JobRepository(session).live_attempts_on(host_id)
    return [
        registry_pb2.RunningJob(job_id=r.job_id, attempt=r.attempt, state=JobState(r.state).pb)
        for r in rows
        if r.state in JobState._value2member_map_
    ]
