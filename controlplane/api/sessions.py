"""SessionService: create, read, list, extend, finish and destroy interactive sessions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gpuplane.v1 import sessions_pb2, sessions_pb2_grpc, types_pb2

from controlplane.api.convert import timestamp
from controlplane.auth.principal import current_principal
from controlplane.errors import InvalidArgument, NotFound
from controlplane.idempotency import check_key, fingerprint
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.states import JobState
from controlplane.paging import PageRequest
from controlplane.sessions.service import SessionService, SessionView, expires_at, spec_of

Context = Any


def destroyed_at(job: Job, attempts: Sequence[JobAttempt]) -> Any:
    """When the session's daemon confirmed its container gone: its last attempt's terminal
    report, once the session has ended (None while it runs, or when its host was lost)."""
    current = next((a for a in attempts if a.attempt == job.attempt), None)
    if not JobState(job.state).terminal or current is None or current.lost or current.live:
        return None
    return current.finished_at


def session_pb(
    job: Job, attempts: Sequence[JobAttempt] = (), warning: str = ""
) -> sessions_pb2.Session:
    spec = spec_of(job)
    current = next((a for a in attempts if a.attempt == job.attempt), None)
    return sessions_pb2.Session(
        session_id=job.id,
        tenant_id=job.tenant_id,
        state=JobState(job.state).pb,
        state_reason=_reason(job, spec),
        host_id=job.host_id or "",
        gpu_uuids=job.gpu_uuids,
        image=spec.image,
        gpu_count=spec.gpu_count,
        created_at=timestamp(job.created_at),
        updated_at=timestamp(job.updated_at),
        started_at=timestamp(job.started_at),
        expires_at=timestamp(expires_at(job)),
        finished_at=timestamp(job.finished_at),
        destroyed_at=timestamp(destroyed_at(job, attempts)),
        duration_seconds=spec.max_duration_seconds,
        price_per_gpu_hour_micro_credits=job.price_per_gpu_hour,
        hold_micro_credits=job.hold_amount,
        charged_micro_credits=job.charged,
        run_time_ms=current.run_time_ms if current is not None else 0,
        warning=warning,
        ssh_public_keys=spec.session.ssh_public_keys,
    )


def _reason(job: Job, spec: types_pb2.JobSpec) -> str:
    """The job's state reason, in a session's words where they differ (its time limit)."""
    if job.state == JobState.TIMED_OUT.value:
        return f"session expired: its {spec.max_duration_seconds} s were up"
    return job.state_reason


def view_pb(view: SessionView) -> sessions_pb2.Session:
    return session_pb(view.job, view.attempts, view.warning)


def _session_id(session_id: str) -> str:
    if not session_id:
        raise InvalidArgument("session_id", "is required")
    if len(session_id) > 40:
        raise NotFound(f"session_id: no session {session_id[:40]!r}")
    return session_id


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    def __init__(self, sessions: SessionService) -> None:
        self.sessions = sessions

    async def CreateSession(
        self, request: sessions_pb2.CreateSessionRequest, context: Context
    ) -> sessions_pb2.CreateSessionResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required (its image and gpu_count at least)")
        job = await self.sessions.create(
            current_principal(),
            request.spec,
            request.duration_seconds,
            list(request.ssh_public_keys),
            check_key(request.idempotency_key),
            fingerprint(request),
        )
        return sessions_pb2.CreateSessionResponse(session=session_pb(job))

    async def GetSession(
        self, request: sessions_pb2.GetSessionRequest, context: Context
    ) -> sessions_pb2.GetSessionResponse:
        view = await self.sessions.get(current_principal(), _session_id(request.session_id))
        return sessions_pb2.GetSessionResponse(session=view_pb(view))

    async def ListSessions(
        self, request: sessions_pb2.ListSessionsRequest, context: Context
    ) -> sessions_pb2.ListSessionsResponse:
        states = []
        for value in request.states:
            if value == types_pb2.JOB_STATE_UNSPECIFIED or value not in types_pb2.JobState.values():
                raise InvalidArgument("states", f"unknown job state {value}")
            states.append(JobState.from_pb(value))
        page = await self.sessions.list_sessions(
            current_principal(),
            request.tenant_id,
            states,
            PageRequest(request.page_token, request.page_size),
        )
        return sessions_pb2.ListSessionsResponse(
            sessions=[session_pb(j) for j in page.items], next_page_token=page.next_cursor
        )

    async def ExtendSession(
        self, request: sessions_pb2.ExtendSessionRequest, context: Context
    ) -> sessions_pb2.ExtendSessionResponse:
        view = await self.sessions.extend(
            current_principal(), _session_id(request.session_id), request.duration_seconds
        )
        return sessions_pb2.ExtendSessionResponse(session=view_pb(view))

    async def FinishSession(
        self, request: sessions_pb2.FinishSessionRequest, context: Context
    ) -> sessions_pb2.FinishSessionResponse:
        view = await self.sessions.finish(current_principal(), _session_id(request.session_id))
        return sessions_pb2.FinishSessionResponse(session=view_pb(view))

    async def DestroySession(
        self, request: sessions_pb2.DestroySessionRequest, context: Context
    ) -> sessions_pb2.DestroySessionResponse:
        view = await self.sessions.destroy(
            current_principal(), _session_id(request.session_id), request.reason
        )
        return sessions_pb2.DestroySessionResponse(session=view_pb(view))
