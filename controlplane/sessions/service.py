"""Interactive sessions: jobs of their own kind (id `ses_…`), created, extended, done, destroyed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gpuplane.v1 import registry_pb2, types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.db.base import utcnow
from controlplane.errors import FailedPrecondition, NotFound
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.outcomes import StopReason
from controlplane.jobs.policy import hold_for
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.service import JobService, limit_refusal
from controlplane.jobs.states import ON_HOST, JobState, note_job_event
from controlplane.ledger import service as ledger
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.transfers import scoped_key
from controlplane.paging import Page, PageRequest
from controlplane.sessions.spec import session_spec, validate_duration

PREFIX = "ses"
ID_PREFIX = f"{PREFIX}_"
# The reason of the event that warns of a session's expiry starts with this.
WARNING = "expiry warning: "
DONE = "done: ended by the user"


@dataclass
class SessionView:
    job: Job
    attempts: Sequence[JobAttempt]
    # The latest expiry warning's text ("" when none was given).
    warning: str = ""


def spec_of(job: Job) -> types_pb2.JobSpec:
    return types_pb2.JobSpec.FromString(job.spec)


def expires_at(job: Job) -> datetime | None:
    """When the running session's time is up: its start plus its duration."""
    if job.started_at is None:
        return None
    return job.started_at + timedelta(seconds=spec_of(job).max_duration_seconds)


def _missing(session_id: str) -> NotFound:
    return NotFound(f"session_id: no session {session_id!r}")


class SessionService:
    """Sessions through the jobs domain: the same states, placement, hold and billing; what
    is their own is the spec (session_spec), extending and the "done" ending."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    async def create(
        self,
        caller: Principal,
        spec: types_pb2.JobSpec,
        duration_seconds: int,
        keys: list[str],
        idempotency_key: str | None,
        request_hash: str,
    ) -> Job:
        made = session_spec(spec, duration_seconds, keys)
        # Stored with the jobs' keys, in a space of its own: SubmitJob's key is another one.
        key = scoped_key("session", idempotency_key) if idempotency_key else None
        return await self.jobs.submit(caller, made, key, request_hash, kind=PREFIX)

    async def get(self, caller: Principal, session_id: str) -> SessionView:
        if not session_id.startswith(ID_PREFIX):
            raise _missing(session_id)
        try:
            view = await self.jobs.get(caller, session_id)
            _, events = await self.jobs.events_after(caller, session_id, 0)
        except NotFound:
            raise _missing(session_id) from None
        warnings = [e.reason for e in events if e.reason.startswith(WARNING)]
        return SessionView(view.job, view.attempts, warnings[-1] if warnings else "")

    async def list_sessions(
        self, caller: Principal, tenant_id: str, states: Sequence[JobState], page: PageRequest
    ) -> Page[Job]:
        return await self.jobs.list_jobs(
            caller, tenant_id, states, {}, None, None, page, id_prefix=ID_PREFIX
        )

    async def finish(self, caller: Principal, session_id: str) -> SessionView:
        """The user is done: the container goes, the session ends SUCCEEDED (a queued one,
        which never ran, CANCELLED)."""
        await self._stop(caller, session_id, "", StopReason.STOP_REASON_SESSION_DONE, DONE)
        return await self.get(caller, session_id)

    async def destroy(self, caller: Principal, session_id: str, reason: str) -> SessionView:
        why = f"destroyed: {reason}" if reason else "destroyed by the user"
        await self._stop(caller, session_id, reason, StopReason.STOP_REASON_CANCELLED, why)
        return await self.get(caller, session_id)

    async def _stop(
        self,
        caller: Principal,
        session_id: str,
        reason: str,
        stop: StopReason.ValueType,
        why: str,
    ) -> None:
        if not session_id.startswith(ID_PREFIX):
            raise _missing(session_id)
        try:
            await self.jobs.cancel(caller, session_id, reason, stop, why)
        except NotFound:
            raise _missing(session_id) from None

    async def extend(self, caller: Principal, session_id: str, seconds: int) -> SessionView:
        """Adds `seconds`: the hold topped up by their price (refused, nothing changed, when
        the credit or the spending limit cannot cover it), the duration and the hold's
        expiry moved, an event recorded and the host told (ExtendCommand)."""
        if not session_id.startswith(ID_PREFIX):
            raise _missing(session_id)
        now = utcnow()

        async def work(session: AsyncSession) -> Job:
            repo = JobRepository(session)
            job = await repo.get_readable(caller, session_id, lock=True)
            if job is None:
                raise _missing(session_id)
            state = JobState(job.state)
            if state.terminal or job.cancel_requested:
                raise FailedPrecondition(
                    f"session_id: session {session_id} has ended ({state.value}); create a new one"
                )
            spec = spec_of(job)
            validate_duration("duration_seconds", seconds, spec.max_duration_seconds)
            longer = types_pb2.JobSpec()
            longer.CopyFrom(spec)
            longer.max_duration_seconds += seconds
            more = hold_for(longer, self.jobs.policy.default_max_price) - job.hold_amount
            await self._top_up(session, job, more, longer.max_duration_seconds, seconds)
            job.spec = longer.SerializeToString(deterministic=True)
            job.hold_amount += max(more, 0)
            total = longer.max_duration_seconds
            note_job_event(repo, job, f"extended by {seconds} s to {total} s", now=now)
            if state in ON_HOST:
                extend = registry_pb2.ExtendCommand(
                    job_id=job.id, attempt=job.attempt, max_duration_seconds=total
                )
                message = registry_pb2.ControlMessage(extend=extend)
                await self.jobs._command(session, job, message, now)
            return job

        job = await self.jobs.db.run(work)
        if job.host_id:
            self.jobs.streams.wake(job.host_id)
        self.jobs.notifier.job_changed(session_id)
        return await self.get(caller, session_id)

    async def _top_up(
        self, session: AsyncSession, job: Job, amount: int, total: int, seconds: int
    ) -> None:
        hold = await LedgerRepository(session).hold_of_job(job.id)
        if hold is None:
            raise FailedPrecondition(f"session_id: session {job.id} holds no credit")
        key = f"job/{job.id}/extend/{total}"
        expiry = hold.expires_at + timedelta(seconds=seconds)
        try:
            await self.jobs.ledger.top_up(session, hold.id, max(amount, 0), key, expiry)
        except ledger.SpendingLimitExceeded as refused:
            raise FailedPrecondition(limit_refusal(refused.budget, amount)) from None
        except FailedPrecondition:
            raise FailedPrecondition(
                f"insufficient credit: extending by {seconds} s needs a hold of "
                f"{ledger.format_credits(amount)} credits more; deposit more or extend by less "
                "(duration_seconds)"
            ) from None
