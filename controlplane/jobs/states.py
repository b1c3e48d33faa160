"""The job state machine: states, the transition table (one comment per edge) and checks."""

from __future__ import annotations

from enum import StrEnum

from gpuplane.v1 import types_pb2


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

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.QUEUED: frozenset(
        {
            S.SCHEDULED,  # the scheduler placed the attempt on a host's GPUs
            S.CANCELLED,  # cancelled before it ever ran
            S.REJECTED,  # no host could ever satisfy it
            S.FAILED,  # retries exhausted while waiting
        }
    ),
    S.SCHEDULED: frozenset(
        {
            S.STARTING,  # the daemon took the dispatch and prepares image and inputs
            S.RUNNING,  # the STARTING report was skipped or arrives later (it is then ignored)
            S.UPLOADING,  # the container ran and exited between two reports
            S.FAILED,  # the daemon could not start it (image missing, runtime error)
            S.QUEUED,  # the attempt was lost (host lost, never acked): retried as attempt+1
            S.CANCELLED,  # cancelled; the daemon stopped it or it never started
            S.SUCCEEDED,  # reports collapsed: finished before the control plane saw it run
            S.TIMED_OUT,  # reports collapsed: timed out before the control plane saw it run
        }
    ),
    S.STARTING: frozenset(
        {
            S.RUNNING,  # the container is running
            S.UPLOADING,  # it ran and exited between two reports
            S.FAILED,  # it could not start
            S.QUEUED,  # the attempt was lost
            S.CANCELLED,  # cancelled while starting
            S.SUCCEEDED,  # reports collapsed
            S.TIMED_OUT,  # reports collapsed
        }
    ),
    S.RUNNING: frozenset(
        {
            S.UPLOADING,  # the container exited; outputs and logs are being stored
            S.SUCCEEDED,  # exit 0 and results stored (UPLOADING collapsed)
            S.FAILED,  # non-zero exit, OOM, budget exhausted, upload failed
            S.TIMED_OUT,  # ran past max_duration and was stopped
            S.CANCELLED,  # cancelled and stopped
            S.QUEUED,  # the attempt was lost mid-run
        }
    ),
    S.UPLOADING: frozenset(
        {
            S.SUCCEEDED,  # exit 0, manifest stored
            S.FAILED,  # non-zero exit (results still stored) or upload failed
            S.TIMED_OUT,  # stopped at max_duration; partial results stored
            S.CANCELLED,  # cancelled during upload
            S.QUEUED,  # the host was lost before the results were stored
        }
    ),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.TIMED_OUT: frozenset(),
    S.REJECTED: frozenset(),
}


def can_transition(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]
