"""How the daemon ends an attempt: its run-time limit and the StopReason of each ending."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from gpuplane.v1 import messaging_pb2

from daemon.inputs import InputCorrupt, InputError, InputFetchFailed
from daemon.runtime import ContainerError, ExitInfo, ImagePullFailed, ImageUnavailable
from daemon.uploads import Stored

StopReason = messaging_pb2.StopReason
Reason: TypeAlias = messaging_pb2.StopReason.ValueType

# Why an attempt could not start, by the error its preparation raised.
START_FAILURES: dict[type[Exception], Reason] = {
    # Before InputError: the first class an error is an instance of decides.
    InputCorrupt: StopReason.STOP_REASON_INPUT_CORRUPT,
    InputError: StopReason.STOP_REASON_INPUT_UNAVAILABLE,
    # Storage unreachable from the host, or its disk: the host's fault (retried elsewhere).
    InputFetchFailed: StopReason.STOP_REASON_HOST_ERROR,
    ImageUnavailable: StopReason.STOP_REASON_IMAGE_UNAVAILABLE,
    ImagePullFailed: StopReason.STOP_REASON_IMAGE_PULL_FAILED,
    ContainerError: StopReason.STOP_REASON_CONTAINER_ERROR,
}


@dataclass(frozen=True, slots=True)
class RunLimit:
    """How long the container may run (seconds, 0: no limit) and why it is stopped there:
    TIMED_OUT at max_duration, BUDGET_EXHAUSTED at the run time the budget pays for."""

    seconds: float
    reason: Reason = StopReason.STOP_REASON_TIMED_OUT

    def after(self, elapsed: float) -> RunLimit:
        """What is left of the limit once the container has run `elapsed` seconds."""
        if not self.seconds:
            return self
        return RunLimit(max(self.seconds - elapsed, 0.001), self.reason)

    def stop_reason(self, budget_spent: bool) -> Reason:
        """Why a running container was stopped: its budget, or this limit."""
        return StopReason.STOP_REASON_BUDGET_EXHAUSTED if budget_spent else self.reason


def run_limit(dispatch: messaging_pb2.DispatchMessage) -> RunLimit:
    """The attempt's limit: max_duration_seconds or the dispatch's budget_run_time_ms,
    whichever comes first (max_duration on a tie: the charge is the same)."""
    if dispatch.spec.HasField("session") or dispatch.spec.HasField("service_replica"):
        return RunLimit(0.0)  # its deadline moves: daemon/sessions.SessionDeadline stops it
    max_ms = dispatch.spec.max_duration_seconds * 1000
    budget_ms = dispatch.budget_run_time_ms
    if budget_ms and (not max_ms or budget_ms < max_ms):
        return RunLimit(budget_ms / 1000, StopReason.STOP_REASON_BUDGET_EXHAUSTED)
    return RunLimit(float(dispatch.spec.max_duration_seconds))


def finished_reason(info: ExitInfo, stored: Stored, *, stopped: Reason | None) -> Reason:
    """Why an attempt whose container ended (and whose results were stored, or not) ended;
    `stopped`: the limit it was stopped at (TIMED_OUT or BUDGET_EXHAUSTED), if any."""
    if stopped is not None:
        return stopped
    if info.oom_killed:
        return StopReason.STOP_REASON_OOM_KILLED
    if stored.failure:
        return stored.failure
    if info.exit_code == 0:
        return StopReason.STOP_REASON_COMPLETED
    return StopReason.STOP_REASON_EXITED_WITH_ERROR


def finished_detail(info: ExitInfo, stored: Stored) -> str:
    """The `reason` of a FINISHED report: what went wrong storing results, or which limit the
    container ran into, in words a user can act on."""
    if stored.detail:
        return stored.detail
    if info.oom_killed:
        limit = info.memory_limit_bytes
        what = f"its memory limit of {limit >> 20} MiB" if limit else "the memory it was given"
        return (
            f"the job used more than {what} (its processes, /tmp and /dev/shm together) and "
            "was killed; ask for more with --memory (spec.memory_bytes)"
        )
    return ""


def start_failure(exc: Exception) -> Reason:
    return next(r for kind, r in START_FAILURES.items() if isinstance(exc, kind))
