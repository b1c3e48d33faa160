"""The job and attempt state machines: their tables, their only setters and the job's history."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, Protocol

from gpuplane.v1 import types_pb2

from controlplane.jobs.models import Job, JobAttempt, JobEvent
from controlplane.statemachine import StateMachine, produces, register


class JobState(StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    STARTING = "starting"
    RUNNING = "running"
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def pb(self) -> types_pb2.JobState.ValueType:
        return types_pb2.JobState.Value(f"JOB_STATE_{self.name}")

    @classmethod
    def from_pb(cls, value: types_pb2.JobState.ValueType) -> JobState:
        name = types_pb2.JobState.Name(value).removeprefix("JOB_STATE_")
        return cls[name]


S = JobState
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMED_OUT, S.REJECTED})
# States in which an attempt is live on a host.
ON_HOST = frozenset({S.SCHEDULED, S.STARTING, S.RUNNING, S.UPLOADING})

JOB = register(
    StateMachine(
        "job",
        JobState,
        S.QUEUED,
        {
            S.QUEUED: {
                S.SCHEDULED: "the scheduler placed the attempt on a host's GPUs",
                S.CANCELLED: "cancelled before it ever ran",
                S.FAILED: "its hold expired before it was placed (hold_expired)",
                S.REJECTED: "no registered host could ever run it, past the grace",
            },
            S.SCHEDULED: {
                S.STARTING: "the daemon took the dispatch and prepares image and inputs",
                S.RUNNING: "the STARTING report was skipped or arrives later (then ignored)",
                S.UPLOADING: "the container ran and exited between two reports",
                S.FAILED: "the daemon could not start it (image missing, runtime error)",
                S.QUEUED: "the attempt was lost (host lost, never acked, pull failed) or exited "
                "with a code the spec retries: retried as attempt+1",
                S.CANCELLED: "cancelled; the daemon stopped it or it never started",
                S.SUCCEEDED: "reports collapsed: finished before the control plane saw it run",
                S.TIMED_OUT: "reports collapsed: timed out before the control plane saw it run",
            },
            S.STARTING: {
                S.RUNNING: "the container is running",
                S.UPLOADING: "it ran and exited between two reports",
                S.FAILED: "it could not start",
                S.QUEUED: "the attempt was lost or exited with a retried code: attempt+1",
                S.CANCELLED: "cancelled while starting",
                S.SUCCEEDED: "reports collapsed",
                S.TIMED_OUT: "reports collapsed",
            },
            S.RUNNING: {
                S.UPLOADING: "the container exited; outputs and logs are being stored",
                S.SUCCEEDED: "exit 0 and results stored (UPLOADING collapsed), or a session done",
                S.FAILED: "non-zero exit, OOM, budget exhausted, upload failed; a session lost",
                S.TIMED_OUT: "ran past max_duration (a session: expired) and was stopped",
                S.CANCELLED: "cancelled and stopped",
                S.QUEUED: "lost mid-run, or exited with a code the spec retries: attempt+1",
            },
            S.UPLOADING: {
                S.SUCCEEDED: "exit 0, manifest stored",
                S.FAILED: "non-zero exit (results still stored) or upload failed",
                S.TIMED_OUT: "stopped at max_duration; partial results stored",
                S.CANCELLED: "cancelled during upload",
                S.QUEUED: "lost before the results were stored, or the exit code is retried",
            },
            S.SUCCEEDED: {},
            S.FAILED: {},
            S.CANCELLED: {},
            S.TIMED_OUT: {},
            S.REJECTED: {},
        },
    )
)


class AttemptState(StrEnum):
    """One attempt of a job on one host. The values are those of the job's states it runs
    through (and the strings stored before this enum existed), plus LOST."""

    SCHEDULED = "scheduled"
    STARTING = "starting"
    RUNNING = "running"
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    # Lost to a provider fault (host lost or revoked, dispatch never taken, host error):
    # never charged, and the job is retried or ends.
    LOST = "lost"


A = AttemptState
# An attempt in these states holds its GPUs and its reports are accepted (JobAttempt.live).
LIVE = frozenset({A.SCHEDULED, A.STARTING, A.RUNNING, A.UPLOADING})
_ENDINGS = {
    A.SUCCEEDED: "a final report: exit 0 and results stored",
    A.FAILED: "a final report: it could not start, failed, or was stopped by its host",
    A.CANCELLED: "a final report: stopped on the job's cancellation",
    A.TIMED_OUT: "a final report: stopped at max_duration",
    A.LOST: "its host was lost or revoked, reported a host fault, or never took the dispatch",
}
ATTEMPT = register(
    StateMachine(
        "attempt",
        AttemptState,
        A.SCHEDULED,
        {
            A.SCHEDULED: {
                A.STARTING: "the daemon took the dispatch and prepares image and inputs",
                A.RUNNING: "the STARTING report was skipped",
                A.UPLOADING: "the container ran and exited between two reports",
                **_ENDINGS,
            },
            A.STARTING: {
                A.RUNNING: "the container is running",
                A.UPLOADING: "it ran and exited between two reports",
                **_ENDINGS,
            },
            A.RUNNING: {
                A.UPLOADING: "the container exited; outputs and logs are being stored",
                **_ENDINGS,
            },
            A.UPLOADING: dict(_ENDINGS),
            A.SUCCEEDED: {},
            A.FAILED: {},
            A.CANCELLED: {},
            A.TIMED_OUT: {},
            A.LOST: {},
        },
    )
)


class Adder(Protocol):
    """Where the history rows go (a JobRepository)."""

    def add(self, row: Job | JobAttempt | JobEvent) -> None: ...


# Job -----------------------------------------------------------------------------------------


def new_job(
    events: Adder,
    *,
    job_id: str,
    tenant_id: str,
    spec: bytes,
    gpu_count: int,
    priority: int,
    max_retries: int,
    labels: dict[str, str],
    hold_amount: int,
    idempotency_key: str | None,
    request_hash: str,
    now: datetime,
) -> Job:
    """A new job, QUEUED as attempt 1, its first event recorded through the setter's path."""
    job = Job(
        id=job_id,
        tenant_id=tenant_id,
        spec=spec,
        state_reason="",
        attempt=1,
        gpu_count=gpu_count,
        priority=priority,
        max_retries=max_retries,
        labels=labels,
        gpu_uuids=[],
        hold_amount=hold_amount,
        charged=0,
        price_per_gpu_hour=0,
        event_seq=0,
        cancel_requested=False,
        created_at=now,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    events.add(job)
    _enter(events, job, JOB.initial, reason="", exit_code=None, now=now)
    # What GetJob shows until a scheduling cycle says why it waits (the event's reason is "").
    job.state_reason = "waiting for the scheduler"
    return job


def set_job_state(
    events: Adder,
    job: Job,
    target: JobState,
    *,
    reason: str = "",
    exit_code: int | None = None,
    now: datetime,
) -> bool:
    """The job's only setter: moves `job` to `target` and records the event; False (nothing
    changed) when the job is already there or the edge is not in JOB's table."""
    if not JOB.check(JobState(job.state), target):
        return False
    _enter(events, job, target, reason=reason, exit_code=exit_code, now=now)
    return True


def note_job_event(events: Adder, job: Job, reason: str, *, now: datetime) -> None:
    """Records something the control plane did about the job without changing its state (a
    capped run-time report): an event in the job's history, in its current state."""
    job.event_seq += 1
    job.updated_at = now
    events.add(
        JobEvent(
            job_id=job.id,
            seq=job.event_seq,
            attempt=job.attempt,
            state=job.state,
            reason=reason[:1000],
            exit_code=None,
            time=now,
        )
    )


def _enter(
    events: Adder,
    job: Job,
    target: JobState,
    *,
    reason: str,
    exit_code: int | None,
    now: datetime,
) -> None:
    """Assigns the state and writes the job's history (JobEvent, numbered by event_seq)."""
    job.state = target.value
    job.state_reason = reason
    job.updated_at = now
    job.event_seq += 1
    if exit_code is not None:
        job.exit_code = exit_code
    if target.terminal:
        job.finished_at = now
    events.add(
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


# Attempt ---------------------------------------------------------------------------------


def set_attempt_state(
    attempt: JobAttempt, target: AttemptState, *, reason: str = "", now: datetime
) -> bool:
    """The attempt's only setter; it keeps `live` and `lost` in step with the state. An
    attempt that ends gets `reason` and `finished_at`. Its history is the job's: every
    attempt change comes with a job event naming the attempt. False when nothing changed."""
    if not ATTEMPT.check(AttemptState(attempt.state), target):
        return False
    attempt.state = target.value
    attempt.live = target in LIVE
    attempt.lost = target == A.LOST
    # The control plane's budget deadline counts from when it saw the attempt run, and only
    # a running attempt has one (jobs/budget.py sweeps them).
    if target == A.RUNNING and attempt.budget_ms is not None:
        attempt.budget_stop_at = now + timedelta(milliseconds=attempt.budget_ms)
    else:
        attempt.budget_stop_at = None
    if target in ATTEMPT.terminal:
        attempt.reason = reason
        attempt.finished_at = now
    return True


# The end of the attempt whose final report ends its job in the key (both setters take
# their targets from here: a report's outcome is computed, not written at the call).
ATTEMPT_ENDING: Final = produces(
    {
        S.SUCCEEDED: A.SUCCEEDED,
        S.FAILED: A.FAILED,
        S.CANCELLED: A.CANCELLED,
        S.TIMED_OUT: A.TIMED_OUT,
    }
)


# The scheduler's batch form --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    job: Job
    host_id: str
    gpu_uuids: list[str]
    price_per_gpu_hour: int
    # The attempt's budget and the run time it pays for (jobs/budget.AttemptBudget).
    budget: int | None = None
    budget_ms: int | None = None


@dataclass(slots=True)
class PlacedRows:
    """The rows of a cycle's placements for the scheduler's bulk statements (the loaded
    jobs are only read): each job's update (`b_id` is its id), its new attempt, its event."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def schedule_jobs(placements: Sequence[Placement], now: datetime) -> PlacedRows:
    """The batch form of both setters for a scheduling cycle: every job's QUEUED → SCHEDULED
    edge is checked (InvalidTransition: the cycle rolls back), each new attempt starts in
    ATTEMPT's initial state, and each job's event is written as `_enter` would."""
    rows = PlacedRows()
    for placement in placements:
        job = placement.job
        JOB.require(JobState(job.state), S.SCHEDULED)
        reason = f"placed on {placement.host_id}"
        rows.jobs.append(
            {
                "b_id": job.id,
                "state": S.SCHEDULED.value,
                "state_reason": reason,
                "host_id": placement.host_id,
                "gpu_uuids": placement.gpu_uuids,
                "price_per_gpu_hour": placement.price_per_gpu_hour,
                "event_seq": job.event_seq + 1,
                "updated_at": now,
            }
        )
        rows.attempts.append(_new_attempt_row(job, placement, now))
        rows.events.append(
            {
                "job_id": job.id,
                "seq": job.event_seq + 1,
                "attempt": job.attempt,
                "state": S.SCHEDULED.value,
                "reason": reason,
                "exit_code": None,
                "time": now,
            }
        )
    return rows


def _new_attempt_row(job: Job, placement: Placement, now: datetime) -> dict[str, Any]:
    initial = ATTEMPT.initial
    return {
        "job_id": job.id,
        "attempt": job.attempt,
        "host_id": placement.host_id,
        "gpu_uuids": placement.gpu_uuids,
        "state": initial.value,
        "reason": "",
        "live": initial in LIVE,
        "lost": initial == A.LOST,
        "report_seq": 0,
        "run_time_ms": 0,
        "charged": 0,
        "manifest": [],
        "created_at": now,
        "budget": placement.budget,
        "budget_ms": placement.budget_ms,
    }
