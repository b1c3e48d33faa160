"""Job lifecycle: submit (with its hold), cancel, daemon reports (metered charging, budget
stop), lost attempts (their charges refunded), settlement and hold expiry."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuplane.v1 import messaging_pb2, registry_pb2, types_pb2
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from controlplane.idempotency import ensure_same
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.jobs.notify import Notifier
from controlplane.jobs.outcomes import CANCEL_TEXTS, Ending, ending_of
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.spec import validate_labels, validate_spec
from controlplane.jobs.states import ON_HOST, JobState, can_transition
from controlplane.ledger import service as ledger
from controlplane.ledger.holds import NOTHING, AttemptCost, Charged
from controlplane.ledger.models import HoldState
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.service import LedgerService
from controlplane.paging import Page, PageRequest
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.service import HostSessions

log = logging.getLogger(__name__)
Kind = messaging_pb2.JobReportKind
StopReason = messaging_pb2.StopReason
TERMINAL_REPORTS = frozenset(
    {
        Kind.JOB_REPORT_KIND_FINISHED,
        Kind.JOB_REPORT_KIND_STOPPED,
        Kind.JOB_REPORT_KIND_FAILED_TO_START,
    }
)
# States in which a job still runs up cost on its host.
RUNS_UP_COST = frozenset({JobState.SCHEDULED, JobState.STARTING, JobState.RUNNING})


@dataclass(frozen=True, slots=True)
class JobPolicy:
    fee_basis_points: int
    # Price used for the hold when the job names no max price (the policy's ceiling).
    default_max_price: int
    allow_simulated_by_default: bool
    retry_backoff: timedelta = timedelta(seconds=1)
    # A placed attempt whose daemon has not reported within this is lost.
    dispatch_ack_timeout: timedelta = timedelta(minutes=2)
    # How long a job may wait for placement before its hold expires; the hold lasts this
    # plus max_duration from submit (and again from each requeue).
    hold_queue_timeout: timedelta = timedelta(days=1)


def hold_expiry(spec: types_pb2.JobSpec, policy: JobPolicy, now: datetime) -> datetime:
    """When a hold placed (or requeued) at `now` expires if the job has no outcome by then."""
    return now + policy.hold_queue_timeout + timedelta(seconds=spec.max_duration_seconds)


def hold_for(spec: types_pb2.JobSpec, default_max_price: int) -> int:
    """The budget, or the most the job could cost: price × GPUs × max duration."""
    if spec.budget_micro_credits:
        return spec.budget_micro_credits
    price = spec.max_price_per_gpu_hour_micro_credits or default_max_price
    return ledger.charge_for(price, spec.gpu_count, spec.max_duration_seconds * 1000)


def transition(
    repo: JobRepository,
    job: Job,
    target: JobState,
    *,
    reason: str = "",
    exit_code: int | None = None,
    now: datetime,
) -> bool:
    """Moves `job` to `target` and records the event; False when the edge is not allowed."""
    current = JobState(job.state)
    if current == target or not can_transition(current, target):
        return False
    job.state = target.value
    job.state_reason = reason
    job.updated_at = now
    job.event_seq += 1
    if exit_code is not None:
        job.exit_code = exit_code
    if target.terminal:
        job.finished_at = now
    repo.add(
        JobEvent(
            job_id=job.id,
            seq=job.event_seq,
            attempt=job.attempt,
            state=target.value,
            reason=reason,
            exit_code=exit_code,
            time=now,
        )
    )
    return True


class ForeignReport(Exception):
    """A report on a subject of a host that is not the host of the attempt it is about: a
    host writing about another host's job (its NATS user may publish only under its own
    subject prefix, so this is a bug or a forgery)."""


@dataclass(frozen=True, slots=True)
class _Applied:
    """What applying a report changed, for the work done after its transaction commits."""

    job_id: str
    changed: bool
    live: bool
    command: registry_pb2.ControlMessage | None


@dataclass
class JobView:
    job: Job
    attempts: Sequence[JobAttempt]


class JobService:
    def __init__(
        self,
        db: Database,
        policy: JobPolicy,
        sessions: HostSessions,
        notifier: Notifier,
        ledger: LedgerService | None = None,
    ) -> None:
        self.db = db
        # Holds are placed, charged and settled through it, inside the job's transaction.
        self.ledger = ledger or LedgerService(db)
        self.policy = policy
        self.sessions = sessions
        self.notifier = notifier

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
        return normalised

    async def submit(
        self,
        caller: Principal,
        spec: types_pb2.JobSpec,
        idempotency_key: str | None,
        request_hash: str,
    ) -> Job:
        """Validates, holds credit and queues the job in one transaction."""
        spec = self.prepare_spec(spec)
        hold = hold_for(spec, self.policy.default_max_price)
        now = utcnow()

        async def work(session: AsyncSession) -> Job:
            repo = JobRepository(session)
            if idempotency_key:
                existing = await repo.by_idempotency_key(caller.tenant_id, idempotency_key)
                if existing is not None:
                    ensure_same(existing.request_hash, request_hash, idempotency_key)
                    return existing
            job = Job(
                id=new_id("job"),
                tenant_id=caller.tenant_id,
                spec=spec.SerializeToString(deterministic=True),
                state=JobState.QUEUED.value,
                state_reason="waiting for the scheduler",
                attempt=1,
                gpu_count=spec.gpu_count,
                priority=spec.priority,
                max_retries=spec.max_retries,
                labels=dict(spec.labels),
                gpu_uuids=[],
                hold_amount=hold,
                charged=0,
                price_per_gpu_hour=0,
                event_seq=1,
                cancel_requested=False,
                created_at=now,
                updated_at=now,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            repo.add(job)
            repo.add(JobEvent(job_id=job.id, seq=1, attempt=1, state="queued", time=now))
            await repo.flush()
            try:
                await self.ledger.place_hold(
                    session,
                    tenant_id=caller.tenant_id,
                    amount=hold,
                    key=f"job/{job.id}/hold",
                    expires_at=hold_expiry(spec, self.policy, now),
                    job_id=job.id,
                )
            except FailedPrecondition:
                raise FailedPrecondition(
                    f"insufficient credit: the job needs a hold of "
                    f"{ledger.format_credits(hold)} credits; deposit more or set a lower "
                    "spec.budget_micro_credits or spec.max_duration_seconds"
                ) from None
            return job

        try:
            job = await self.db.run(work)
        except IntegrityError:
            if not idempotency_key:
                raise
            async with self.db.read() as session:
                existing = await JobRepository(session).by_idempotency_key(
                    caller.tenant_id, idempotency_key
                )
            if existing is None:
                raise
            ensure_same(existing.request_hash, request_hash, idempotency_key)
            return existing
        self.notifier.schedule.set()
        return job

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
    ) -> Page[Job]:
        owner = None if caller.is_admin and not tenant_id else caller.require_tenant(tenant_id)
        validate_labels("labels", labels)
        async with self.db.read() as session:
            return await JobRepository(session).list(
                caller,
                owner,
                [s.value for s in states],
                created_after,
                created_before,
                labels,
                page,
            )

    async def cancel(self, caller: Principal, job_id: str, reason: str) -> Job:
        if len(reason) > 500:
            raise InvalidArgument("reason", "at most 500 characters")
        now = utcnow()

        async def work(session: AsyncSession) -> tuple[Job, registry_pb2.ControlMessage | None]:
            repo = JobRepository(session)
            job = await repo.get_readable(caller, job_id, lock=True)
            if job is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            state = JobState(job.state)
            why = f"cancelled: {reason}" if reason else "cancelled by the user"
            if state == JobState.QUEUED:
                transition(repo, job, JobState.CANCELLED, reason=why, now=now)
                await self._settle(session, job, None, None)
            elif state in ON_HOST:
                job.cancel_requested = True
                job.state_reason = "cancel requested"
                return job, self._cancel_command(job, text=why)
            return job, None

        job, command = await self.db.run(work)
        if command is not None:
            self.sessions.send(job.host_id or "", command)
        self.notifier.job_changed(job_id)
        return job

    @staticmethod
    def _cancel_command(
        job: Job,
        stop_reason: messaging_pb2.StopReason.ValueType = StopReason.STOP_REASON_CANCELLED,
        text: str = "",
    ) -> registry_pb2.ControlMessage:
        """Asks the job's host to stop it, saying why (`text`: the reason's usual one)."""
        cancel = registry_pb2.CancelCommand(
            job_id=job.id,
            attempt=job.attempt,
            reason=text or CANCEL_TEXTS[stop_reason],
            stop_reason=stop_reason,
        )
        return registry_pb2.ControlMessage(cancel=cancel)

    async def events_after(
        self, caller: Principal, job_id: str, seq: int
    ) -> tuple[Job, Sequence[JobEvent]]:
        async with self.db.read() as session:
            repo = JobRepository(session)
            job = await repo.get_readable(caller, job_id)
            if job is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            return job, await repo.events_after(job_id, seq)

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

    # Daemon reports -----------------------------------------------------------------------

    async def apply_report(
        self, report: messaging_pb2.JobReport, subject_host: str | None = None
    ) -> bool:
        """Applies one daemon report idempotently; False when it was stale or a duplicate.
        `subject_host` is the host its subject names (None: the host-less subject of earlier
        releases); ForeignReport when it, or the report's own host_id, is not the attempt's."""
        if subject_host is not None and report.host_id != subject_host:
            raise ForeignReport(f"report names host {report.host_id!r}")
        now = utcnow()

        async def work(session: AsyncSession) -> _Applied | None:
            repo = JobRepository(session)
            job = await repo.get(report.job_id, lock=True)
            attempt = await repo.attempt(report.job_id, report.attempt, lock=True)
            if job is None or attempt is None:
                log.warning("report for unknown attempt %s/%s", report.job_id, report.attempt)
                return None
            if subject_host is not None and attempt.host_id != subject_host:
                raise ForeignReport(f"the attempt ran on host {attempt.host_id!r}")
            # Fencing: only the live attempt on its own host may change the job.
            if (
                not attempt.live
                or attempt.host_id != report.host_id
                or job.attempt != attempt.attempt
            ):
                log.info("stale report for %s/%s ignored", job.id, attempt.attempt)
                return None
            if report.seq <= attempt.report_seq:
                return None
            attempt.report_seq = report.seq
            if report.run_time_ms:
                attempt.run_time_ms = max(attempt.run_time_ms, report.run_time_ms)
            resend: registry_pb2.ControlMessage | None = None
            ending = ending_of(report, job) if report.kind in TERMINAL_REPORTS else None
            if ending is not None and ending.void:
                await self._lose_attempt(session, repo, job, attempt, ending.text, now)
                changed = True
            else:
                changed = self._apply(repo, job, attempt, report, ending, now)
                if report.kind not in TERMINAL_REPORTS and attempt.run_time_ms:
                    charged = await self._meter(session, job, attempt)
                    if charged.exhausted and JobState(job.state) in RUNS_UP_COST:
                        resend = self._cancel_command(job, StopReason.STOP_REASON_BUDGET_EXHAUSTED)
            if JobState(job.state).terminal and attempt.live:
                await self._finish_attempt(session, job, attempt, now)
            elif job.cancel_requested and report.kind in (
                Kind.JOB_REPORT_KIND_STARTING,
                Kind.JOB_REPORT_KIND_RUNNING,
            ):
                resend = self._cancel_command(job, text=job.state_reason)
            return _Applied(job.id, changed, attempt.live, resend)

        applied = await self.db.run(work)
        if applied is None:
            return False
        if applied.command is not None:
            self.sessions.send(report.host_id, applied.command)
        if applied.changed:
            self.notifier.job_changed(applied.job_id)
            if not applied.live:
                self.notifier.schedule.set()
        return True

    def _apply(
        self,
        repo: JobRepository,
        job: Job,
        attempt: JobAttempt,
        report: messaging_pb2.JobReport,
        ending: Ending | None,
        now: datetime,
    ) -> bool:
        exit_code = report.exit_code if report.HasField("exit_code") else None
        if exit_code is not None:
            attempt.exit_code = exit_code
        kind = report.kind
        if kind == Kind.JOB_REPORT_KIND_STARTING:
            attempt.state = JobState.STARTING.value
            return transition(
                repo, job, JobState.STARTING, reason="preparing image and inputs", now=now
            )
        if kind == Kind.JOB_REPORT_KIND_RUNNING:
            attempt.state = JobState.RUNNING.value
            attempt.started_at = attempt.started_at or now
            job.started_at = job.started_at or now
            return transition(repo, job, JobState.RUNNING, now=now)
        if kind == Kind.JOB_REPORT_KIND_USAGE:
            return False
        if kind == Kind.JOB_REPORT_KIND_UPLOADING:
            attempt.state = JobState.UPLOADING.value
            return transition(
                repo,
                job,
                JobState.UPLOADING,
                reason="storing outputs and logs",
                exit_code=exit_code,
                now=now,
            )
        if ending is None or ending.state is None:
            log.warning("report of unknown kind %s for %s ignored", kind, job.id)
            return False
        if kind == Kind.JOB_REPORT_KIND_FINISHED:
            attempt.manifest = [
                {"key": o.key, "path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256}
                for o in report.manifest
            ]
        target, reason = ending.state, ending.text
        attempt.state = target.value
        attempt.reason = reason
        attempt.finished_at = now
        return transition(repo, job, target, reason=reason, exit_code=exit_code, now=now)

    async def _finish_attempt(
        self, session: AsyncSession, job: Job, attempt: JobAttempt, now: datetime
    ) -> None:
        """Charges a finished attempt (what metering has not), frees its GPUs and resolves
        the job's hold: the rest goes back to available."""
        attempt.live = False
        registry = RegistryRepository(session)
        await registry.release_gpus(job.id, attempt.attempt)
        host = await registry.get_host(attempt.host_id)
        cost = None
        if host is not None:
            host.completed_attempts += 1
            if not attempt.lost:
                cost = self._cost(job, attempt, host.provider_tenant_id)
        await self._settle(session, job, attempt, cost)

    def _cost(self, job: Job, attempt: JobAttempt, provider: str) -> AttemptCost:
        """What the attempt has cost so far, at the placement's price."""
        return AttemptCost(
            provider_tenant_id=provider,
            attempt=attempt.attempt,
            cost=ledger.charge_for(job.price_per_gpu_hour, job.gpu_count, attempt.run_time_ms),
            fee_basis_points=self.policy.fee_basis_points,
        )

    async def _meter(self, session: AsyncSession, job: Job, attempt: JobAttempt) -> Charged:
        """Metered charging of a running attempt: the increment since its last charge, capped
        at the hold. Keys name the attempt and its cumulative run time, so a replay of the
        same report (or an older run time) charges nothing."""
        hold = await LedgerRepository(session).hold_of_job(job.id)
        host = await RegistryRepository(session).get_host(attempt.host_id)
        if hold is None or host is None or attempt.lost:
            return NOTHING
        cost = self._cost(job, attempt, host.provider_tenant_id)
        key = f"job/{job.id}/{attempt.attempt}/meter/{attempt.run_time_ms}"
        charged = await self.ledger.charge(session, hold.id, cost, key)
        attempt.charged += charged.amount
        job.charged += charged.amount
        return charged

    async def _settle(
        self,
        session: AsyncSession,
        job: Job,
        attempt: JobAttempt | None,
        cost: AttemptCost | None,
        outcome: HoldState | None = None,
    ) -> None:
        """Resolves the job's hold once: the final charge of `cost` (if any), the rest
        released. A replay (the hold already resolved) moves nothing."""
        hold = await LedgerRepository(session).hold_of_job(job.id)
        if hold is None:
            return
        number = attempt.attempt if attempt is not None else job.attempt
        resolution = await self.ledger.settle(
            session,
            hold.id,
            cost=cost,
            key=f"job/{job.id}/{number}/final",
            release_key=f"job/{job.id}/release",
            outcome=outcome,
        )
        if attempt is not None:
            attempt.charged += resolution.charged.amount
        if not resolution.replay:
            job.charged = resolution.posted

    # Lost attempts ------------------------------------------------------------------------

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

    # Hold expiry --------------------------------------------------------------------------

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
            ) -> tuple[bool, Job | None, registry_pb2.ControlMessage | None]:
                repo = JobRepository(session)
                job = await repo.get(job_id, lock=True) if job_id else None
                if job is not None and JobState(job.state) in ON_HOST:
                    job.cancel_requested = True
                    job.state_reason = "cancel requested: hold expired"
                    return (
                        False,
                        job,
                        self._cancel_command(job, StopReason.STOP_REASON_HOLD_EXPIRED),
                    )
                if job is not None and job.state == JobState.QUEUED.value:
                    why = "hold_expired: not placed before the job's hold expired"
                    transition(repo, job, JobState.FAILED, reason=why, now=now)
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
                return not resolution.replay, job, None

            done, job, command = await self.db.run(work)
            if command is not None and job is not None:
                self.sessions.send(job.host_id or "", command)
            if done:
                expired.append(hold_id)
                log.warning("hold %s expired (job %s)", hold_id, job_id or "-")
            if job is not None:
                self.notifier.job_changed(job.id)
        return expired

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
        attempt.live = False
        attempt.lost = True
        attempt.state = "lost"
        attempt.reason = why
        attempt.finished_at = now
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
            transition(repo, job, JobState.CANCELLED, reason=job.state_reason, now=now)
        elif job.attempt <= job.max_retries:
            transition(
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
            transition(
                repo,
                job,
                JobState.FAILED,
                reason=f"attempt {job.attempt} lost: {why}; no retries left",
                now=now,
            )
        await self._settle(session, job, None, None)


async def live_attempts_of(db: Database, host_id: str) -> list[registry_pb2.RunningJob]:
    """The attempts the control plane believes run on `host_id` (for HelloAck and resync)."""
    async with db.read() as session:
        rows = await JobRepository(session).live_attempts_on(host_id)
    return [
        registry_pb2.RunningJob(job_id=r.job_id, attempt=r.attempt, state=JobState(r.state).pb)
        for r in rows
        if r.state in JobState._value2member_map_
    ]
