"""JobService: submit, read, cancel, watch, logs and results of jobs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta
from typing import Any

from gpuplane.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2

from controlplane.api.convert import from_timestamp, timestamp
from controlplane.auth.principal import current_principal
from controlplane.errors import InvalidArgument, NotFound, Unavailable
from controlplane.idempotency import check_key, fingerprint
from controlplane.jobs.logs import LogReader
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.jobs.notify import Notifier
from controlplane.jobs.service import JobService
from controlplane.jobs.states import JobState
from controlplane.paging import encode_token, page_size, time_cursor
from controlplane.registry.usage import GpuUsage
from controlplane.scheduler.quote import Quoter
from storage.layout import attempt_prefix, inside
from storage.objects import ObjectStore

log = logging.getLogger(__name__)

Context = Any
DEFAULT_URL_TTL = 3600
MAX_URL_TTL = 7 * 24 * 3600
ATTEMPT_STATES = {s.value for s in JobState} | {"lost"}


def _state_pb(value: str) -> types_pb2.JobState.ValueType:
    if value in JobState._value2member_map_:
        return JobState(value).pb
    return types_pb2.JOB_STATE_UNSPECIFIED


def attempt_pb(row: JobAttempt) -> types_pb2.JobAttempt:
    message = types_pb2.JobAttempt(
        attempt=row.attempt,
        host_id=row.host_id,
        gpu_uuids=row.gpu_uuids,
        state=_state_pb(row.state),
        reason=row.reason,
        started_at=timestamp(row.started_at),
        finished_at=timestamp(row.finished_at),
        charged_micro_credits=row.charged,
    )
    if row.exit_code is not None:
        message.exit_code = row.exit_code
    return message


def job_pb(
    row: Job, attempts: Sequence[JobAttempt] = (), gpu_usage: GpuUsage | None = None
) -> types_pb2.Job:
    """`gpu_usage`: the current attempt's telemetry aggregates, where this process has them."""
    current = next((a for a in attempts if a.attempt == row.attempt), None)
    run_time = current.run_time_ms if current else 0
    gpu_time = sum(a.run_time_ms * max(len(a.gpu_uuids), 0) for a in attempts if not a.lost)
    message = types_pb2.Job(
        job_id=row.id,
        tenant_id=row.tenant_id,
        spec=types_pb2.JobSpec.FromString(row.spec),
        state=JobState(row.state).pb,
        state_reason=row.state_reason,
        attempt=row.attempt,
        host_id=row.host_id or "",
        gpu_uuids=row.gpu_uuids,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        started_at=timestamp(row.started_at),
        finished_at=timestamp(row.finished_at),
        price_per_gpu_hour_micro_credits=row.price_per_gpu_hour,
        hold_micro_credits=row.hold_amount,
        charged_micro_credits=row.charged,
        usage=types_pb2.JobUsage(
            run_time_ms=run_time,
            gpu_time_ms=gpu_time,
            avg_gpu_utilization_percent=gpu_usage.mean_utilization_percent if gpu_usage else 0,
            peak_gpu_memory_bytes=gpu_usage.peak_memory_bytes if gpu_usage else 0,
        ),
        attempts=[attempt_pb(a) for a in attempts],
        idempotency_key=row.idempotency_key or "",
    )
    if row.exit_code is not None:
        message.exit_code = row.exit_code
    return message


def event_pb(row: JobEvent, job_id: str) -> types_pb2.JobEvent:
    message = types_pb2.JobEvent(
        job_id=job_id,
        attempt=row.attempt,
        seq=row.seq,
        state=JobState(row.state).pb,
        reason=row.reason,
        time=timestamp(row.time),
    )
    if row.exit_code is not None:
        message.exit_code = row.exit_code
    return message


def _require_job_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument("job_id", "is required")
    if len(job_id) > 40:
        raise NotFound(f"job_id: no job {job_id[:40]!r}")
    return job_id


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        jobs: JobService,
        quoter: Quoter,
        notifier: Notifier,
        store: ObjectStore,
        logs: LogReader,
        usage: Callable[[str, int], GpuUsage | None] | None = None,
    ) -> None:
        self.jobs = jobs
        self.usage = usage
        self.quoter = quoter
        self.notifier = notifier
        self.store = store
        self.logs = logs

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: Context
    ) -> jobs_pb2.SubmitJobResponse:
        caller = current_principal()
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        if request.dry_run:
            spec = self.jobs.prepare_spec(request.spec)
            return jobs_pb2.SubmitJobResponse(quote=await self.quoter.quote(spec))
        job = await self.jobs.submit(
            caller, request.spec, check_key(request.idempotency_key), fingerprint(request)
        )
        return jobs_pb2.SubmitJobResponse(job=job_pb(job))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: Context
    ) -> jobs_pb2.GetJobResponse:
        view = await self.jobs.get(current_principal(), _require_job_id(request.job_id))
        usage = self.usage(view.job.id, view.job.attempt) if self.usage else None
        return jobs_pb2.GetJobResponse(job=job_pb(view.job, view.attempts, usage))

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: Context
    ) -> jobs_pb2.ListJobsResponse:
        before = time_cursor(request.page_token)
        states = []
        for value in request.states:
            if value == types_pb2.JOB_STATE_UNSPECIFIED or value not in types_pb2.JobState.values():
                raise InvalidArgument("states", f"unknown job state {value}")
            states.append(JobState.from_pb(value))
        limit = page_size(request.page_size)
        rows = await self.jobs.list_jobs(
            current_principal(),
            request.tenant_id,
            states,
            dict(request.labels),
            from_timestamp(request, "created_after"),
            from_timestamp(request, "created_before"),
            before,
            limit + 1,
        )
        more = len(rows) > limit
        rows = list(rows[:limit])
        token = (
            encode_token({"t": rows[-1].created_at.isoformat(), "id": rows[-1].id}) if more else ""
        )
        return jobs_pb2.ListJobsResponse(jobs=[job_pb(r) for r in rows], next_page_token=token)

    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: Context
    ) -> jobs_pb2.CancelJobResponse:
        job = await self.jobs.cancel(
            current_principal(), _require_job_id(request.job_id), request.reason
        )
        return jobs_pb2.CancelJobResponse(job=job_pb(job))

    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[types_pb2.JobEvent]:
        caller = current_principal()
        job_id = _require_job_id(request.job_id)
        seq = request.after_seq
        while True:
            job, events = await self.jobs.events_after(caller, job_id, seq)
            for event in events:
                seq = event.seq
                yield event_pb(event, job_id)
            if JobState(job.state).terminal and seq >= job.event_seq:
                return
            await self.notifier.wait_job(job_id, timeout=1.0)

    async def StreamLogs(
        self, request: jobs_pb2.StreamLogsRequest, context: Context
    ) -> AsyncIterator[jobs_pb2.LogChunk]:
        caller = current_principal()
        job_id = _require_job_id(request.job_id)
        while True:
            job, attempt = await self.jobs.attempt_of(caller, job_id, request.attempt)
            if attempt is not None:
                break
            if not request.follow or JobState(job.state).terminal:
                return  # never placed: nothing was logged
            await self.notifier.wait_job(job_id, timeout=1.0)  # following: wait for a start
        async for chunk in self.logs.read(job, attempt, request):
            yield chunk

    async def GetResults(
        self, request: jobs_pb2.GetResultsRequest, context: Context
    ) -> jobs_pb2.GetResultsResponse:
        ttl = request.url_ttl_seconds or DEFAULT_URL_TTL
        if ttl > MAX_URL_TTL:
            raise InvalidArgument("url_ttl_seconds", "at most 7 days (604800)")
        caller = current_principal()
        job_id = _require_job_id(request.job_id)
        view = await self.jobs.get(caller, job_id)
        candidates = [a for a in view.attempts if a.manifest]
        if request.attempt:
            candidates = [a for a in candidates if a.attempt == request.attempt]
        if not candidates:
            raise NotFound(
                f"job_id: job {job_id} has no stored results yet (state {view.job.state})"
            )
        attempt = candidates[-1]
        # The manifest comes from the provider's daemon: presign only what lies under this
        # attempt's own prefix, never a key naming another job's (or tenant's) objects.
        prefix = attempt_prefix(job_id, attempt.attempt)
        entries = [e for e in attempt.manifest if inside(str(e.get("key", "")), prefix)]
        if len(entries) < len(attempt.manifest):
            log.warning(
                "job %s attempt %d: %d result keys outside %s not presigned",
                job_id,
                attempt.attempt,
                len(attempt.manifest) - len(entries),
                prefix,
            )
        objects = []
        try:
            for entry in entries:
                url = await self.store.presign_get(entry["key"], ttl)
                objects.append(
                    types_pb2.ResultObject(
                        key=entry["key"],
                        path=entry["path"],
                        size_bytes=int(entry["size_bytes"]),
                        sha256=entry["sha256"],
                        url=url,
                    )
                )
        except (TimeoutError, OSError) as error:
            raise Unavailable(f"object storage unavailable: {error}") from None
        from controlplane.db.base import utcnow

        return jobs_pb2.GetResultsResponse(
            job_id=job_id,
            attempt=attempt.attempt,
            objects=objects,
            urls_expire_at=timestamp(utcnow() + timedelta(seconds=ttl)),
        )
