"""JobService: submit, read, cancel, watch, logs and results of jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from gpuplane.v1 import jobs_pb2, jobs_pb2_grpc, types_pb2

from controlplane.api.convert import from_timestamp, timestamp
from controlplane.auth.principal import current_principal
from controlplane.errors import InvalidArgument, NotFound
from controlplane.idempotency import check_key, fingerprint
from controlplane.jobs.dryrun import DryRun
from controlplane.jobs.efficiency import AttemptEfficiency, Efficiency, job_basis_points
from controlplane.jobs.logs import LogReader
from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.jobs.notify import Notifier
from controlplane.jobs.results import JobResults, url_ttl
from controlplane.jobs.service import JobService
from controlplane.jobs.states import JobState
from controlplane.jobs.watchers import JobWatchers
from controlplane.paging import PageRequest
from controlplane.registry.utilization import mean_basis_points, percent_of

Context = Any
MAX_SEQ = 2**63 - 1  # event sequences are stored as signed 64-bit integers


def _state_pb(value: str) -> types_pb2.JobState.ValueType:
    if value in JobState._value2member_map_:
        return JobState(value).pb
    return types_pb2.JOB_STATE_UNSPECIFIED


def _attempt_state_pb(value: str) -> types_pb2.AttemptState.ValueType:
    """An attempt's stored state on the wire (LOST included)."""
    name = f"ATTEMPT_STATE_{value.upper()}"
    if name in types_pb2.AttemptState.keys():
        return types_pb2.AttemptState.Value(name)
    return types_pb2.ATTEMPT_STATE_UNSPECIFIED


def attempt_pb(row: JobAttempt) -> types_pb2.JobAttempt:
    message = types_pb2.JobAttempt(
        attempt=row.attempt,
        host_id=row.host_id,
        gpu_uuids=row.gpu_uuids,
        state=_state_pb(row.state),
        attempt_state=_attempt_state_pb(row.state),
        reason=row.reason,
        started_at=timestamp(row.started_at),
        finished_at=timestamp(row.finished_at),
        charged_micro_credits=row.charged,
        avg_gpu_utilization_basis_points=mean_basis_points(
            row.gpu_utilization_sum, row.gpu_utilization_samples
        ),
        gpu_utilization_samples=row.gpu_utilization_samples,
        peak_gpu_memory_bytes=row.peak_gpu_memory_bytes,
    )
    if row.exit_code is not None:
        message.exit_code = row.exit_code
    return message


def job_pb(row: Job, attempts: Sequence[JobAttempt] = ()) -> types_pb2.Job:
    """The job; its usage (GPU time, utilisation, peak memory) from the attempts' rows."""
    current = next((a for a in attempts if a.attempt == row.attempt), None)
    run_time = current.run_time_ms if current else 0
    gpu_time = sum(a.run_time_ms * max(len(a.gpu_uuids), 0) for a in attempts if not a.lost)
    utilization = job_basis_points(attempts)
    peak = max((a.peak_gpu_memory_bytes for a in attempts if not a.lost), default=0)
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
            avg_gpu_utilization_percent=percent_of(utilization),
            peak_gpu_memory_bytes=peak,
            avg_gpu_utilization_basis_points=utilization,
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


def efficiency_pb(row: AttemptEfficiency) -> jobs_pb2.AttemptEfficiency:
    return jobs_pb2.AttemptEfficiency(
        attempt=row.attempt,
        host_id=row.host_id,
        gpu_model=row.gpu_model,
        gpu_count=row.gpu_count,
        attempt_state=(
            _attempt_state_pb(row.attempt_state)
            if row.attempt_state
            else types_pb2.ATTEMPT_STATE_UNSPECIFIED
        ),
        paid_gpu_time_ms=row.paid_gpu_time_ms,
        utilized_gpu_time_ms=row.utilized_gpu_time_ms,
        avg_gpu_utilization_basis_points=row.basis_points,
        peak_gpu_memory_bytes=row.peak_memory_bytes,
        samples=row.samples,
        charged_micro_credits=row.charged,
        idle_micro_credits=row.idle,
    )


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
        dry_run: DryRun,
        results: JobResults,
        notifier: Notifier,
        logs: LogReader,
        efficiency: Efficiency | None = None,
    ) -> None:
        self.jobs = jobs
        self.watchers = JobWatchers(jobs.db, notifier)
        self.efficiency = efficiency or Efficiency(jobs.db)
        self.dry_run = dry_run
        self.results = results
        self.notifier = notifier
        self.logs = logs

    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: Context
    ) -> jobs_pb2.SubmitJobResponse:
        caller = current_principal()
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        if request.dry_run:
            return jobs_pb2.SubmitJobResponse(quote=await self.dry_run.quote(caller, request.spec))
        job = await self.jobs.submit(
            caller, request.spec, check_key(request.idempotency_key), fingerprint(request)
        )
        return jobs_pb2.SubmitJobResponse(job=job_pb(job))

    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: Context
    ) -> jobs_pb2.GetJobResponse:
        view = await self.jobs.get(current_principal(), _require_job_id(request.job_id))
        return jobs_pb2.GetJobResponse(job=job_pb(view.job, view.attempts))

    async def GetJobEfficiency(
        self, request: jobs_pb2.GetJobEfficiencyRequest, context: Context
    ) -> jobs_pb2.GetJobEfficiencyResponse:
        found = await self.efficiency.of_job(current_principal(), _require_job_id(request.job_id))
        return jobs_pb2.GetJobEfficiencyResponse(
            job_id=found.job_id,
            attempts=[efficiency_pb(a) for a in found.attempts],
            total=efficiency_pb(found.total),
        )

    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: Context
    ) -> jobs_pb2.ListJobsResponse:
        states = []
        for value in request.states:
            if value == types_pb2.JOB_STATE_UNSPECIFIED or value not in types_pb2.JobState.values():
                raise InvalidArgument("states", f"unknown job state {value}")
            states.append(JobState.from_pb(value))
        page = await self.jobs.list_jobs(
            current_principal(),
            request.tenant_id,
            states,
            dict(request.labels),
            from_timestamp(request, "created_after"),
            from_timestamp(request, "created_before"),
            PageRequest(request.page_token, request.page_size),
            request.id_prefix,
        )
        return jobs_pb2.ListJobsResponse(
            jobs=[job_pb(r) for r in page.items], next_page_token=page.next_cursor
        )

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
        if seq > MAX_SEQ:
            raise InvalidArgument("after_seq", f"at most {MAX_SEQ}")
        # The job is read (and the caller checked) first, and again once an event says it
        # ended (its row says whether more events follow); in between each wake-up reads
        # only the events after the last one sent.
        job, events = await self.jobs.events_after(caller, job_id, seq)
        while True:
            for event in events:
                seq = event.seq
                yield event_pb(event, job_id)
            ended = JobState(job.state).terminal
            if ended and seq >= job.event_seq:
                return
            if not ended and any(JobState(event.state).terminal for event in events):
                job, events = await self.jobs.events_after(caller, job_id, seq)
                continue
            await self.watchers.wait(job_id, seq)
            events = await self.jobs.events_since(job_id, seq)

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
        ttl = url_ttl(request.url_ttl_seconds)
        found = await self.results.presigned(
            current_principal(), _require_job_id(request.job_id), request.attempt, ttl
        )
        return jobs_pb2.GetResultsResponse(
            job_id=found.job_id,
            attempt=found.attempt,
            objects=[
                types_pb2.ResultObject(
                    key=o.key, path=o.path, size_bytes=o.size_bytes, sha256=o.sha256, url=o.url
                )
                for o in found.objects
            ],
            urls_expire_at=timestamp(found.urls_expire_at),
            provenance=found.provenance,
            control_plane_public_key=found.control_plane_public_key,
        )
