"""Why an attempt ended (the contract's StopReason), mapped once to the job's end state, who
is at fault and the reason people read; reports of earlier daemon releases translated here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeAlias

from gpuplane.v1 import messaging_pb2

from controlplane.jobs.states import JobState

StopReason = messaging_pb2.StopReason
Reason: TypeAlias = messaging_pb2.StopReason.ValueType
Kind = messaging_pb2.JobReportKind


class Fault(StrEnum):
    """Who an ending is down to. Only a provider's fault voids the attempt: it is never
    charged (what metering charged is refunded) and the job is retried like a lost attempt."""

    NONE = "none"
    USER = "user"
    PLATFORM = "platform"
    PROVIDER = "provider"


class CancelState(Protocol):
    """What an ending's text needs of the job: whether (and why) a stop was asked for."""

    @property
    def cancel_requested(self) -> bool: ...

    @property
    def state_reason(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Facts:
    """What the text of an ending is made from."""

    detail: str
    exit_code: int | None
    job: CancelState


def _cancelled(facts: Facts) -> str:
    return facts.job.state_reason if facts.job.cancel_requested else "cancelled"


def _limit_reached(facts: Facts) -> str:
    return facts.job.state_reason if facts.job.cancel_requested else "spending limit reached"


def _not_started(facts: Facts) -> str:
    return facts.detail or "the job could not start"


def _upload_failed(facts: Facts) -> str:
    return f"upload_failed: {facts.detail or 'outputs could not be stored'}"


def _host_fault(facts: Facts) -> str:
    return f"host fault: {facts.detail or 'host fault'}"


def _pull_failed(facts: Facts) -> str:
    return f"image pull failed on the host: {facts.detail or 'image_pull_failed'}"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One row of the table: the job's end state (None: the attempt is void and the job is
    requeued, or failed when it has no retries left), the fault and the reason's text."""

    state: JobState | None
    fault: Fault
    text: Callable[[Facts], str]


_FAILED = JobState.FAILED
OUTCOMES: Mapping[Reason, Outcome] = {
    # Decided by the job.
    StopReason.STOP_REASON_COMPLETED: Outcome(JobState.SUCCEEDED, Fault.NONE, lambda f: ""),
    StopReason.STOP_REASON_EXITED_WITH_ERROR: Outcome(
        _FAILED, Fault.USER, lambda f: f"exit code {f.exit_code}"
    ),
    StopReason.STOP_REASON_OOM_KILLED: Outcome(
        _FAILED, Fault.USER, lambda f: f"oom: {f.detail}" if f.detail else "oom"
    ),
    StopReason.STOP_REASON_IMAGE_UNAVAILABLE: Outcome(_FAILED, Fault.USER, _not_started),
    StopReason.STOP_REASON_INPUT_UNAVAILABLE: Outcome(_FAILED, Fault.USER, _not_started),
    # The bytes no longer hash as when CompleteUpload recorded them: the platform's object
    # store changed them (or they changed on the way). Nothing ran, so nothing is charged;
    # not retried, as another host would fetch the same object.
    StopReason.STOP_REASON_INPUT_CORRUPT: Outcome(_FAILED, Fault.PLATFORM, _not_started),
    # Docker refusing the job's container: the job is charged nothing and not retried.
    StopReason.STOP_REASON_CONTAINER_ERROR: Outcome(_FAILED, Fault.USER, _not_started),
    StopReason.STOP_REASON_OUTPUT_TOO_LARGE: Outcome(_FAILED, Fault.USER, _upload_failed),
    # Decided by the control plane.
    StopReason.STOP_REASON_CANCELLED: Outcome(JobState.CANCELLED, Fault.USER, _cancelled),
    # Stopped when its budget ran out (by its daemon at the dispatch's budget run time, or on
    # the control plane's stop): the outputs it wrote are stored, and it is charged its budget.
    StopReason.STOP_REASON_BUDGET_EXHAUSTED: Outcome(
        _FAILED, Fault.USER, lambda f: "budget_exhausted"
    ),
    StopReason.STOP_REASON_TIMED_OUT: Outcome(
        JobState.TIMED_OUT, Fault.USER, lambda f: "ran past max_duration_seconds"
    ),
    StopReason.STOP_REASON_HOLD_EXPIRED: Outcome(JobState.CANCELLED, Fault.PLATFORM, _cancelled),
    StopReason.STOP_REASON_DISPATCH_EXPIRED: Outcome(_FAILED, Fault.PLATFORM, _not_started),
    # The tenant's monthly spending limit was reached (jobs/spending.py): ended as a cancel
    # would be, outputs stored, the run charged.
    StopReason.STOP_REASON_SPENDING_LIMIT: Outcome(JobState.CANCELLED, Fault.USER, _limit_reached),
    # Decided by the host. Results that could not be stored end the job (it ran; what was
    # stored is kept): the platform's object store, or the host's path to it.
    StopReason.STOP_REASON_UPLOAD_FAILED: Outcome(_FAILED, Fault.PLATFORM, _upload_failed),
    # The control plane had lost track of the attempt: taken as a cancel.
    StopReason.STOP_REASON_ORPHANED: Outcome(JobState.CANCELLED, Fault.PLATFORM, _cancelled),
    StopReason.STOP_REASON_HOST_ERROR: Outcome(None, Fault.PROVIDER, _host_fault),
    StopReason.STOP_REASON_DAEMON_RESTARTED: Outcome(None, Fault.PROVIDER, _host_fault),
    StopReason.STOP_REASON_GPUS_MISSING: Outcome(None, Fault.PROVIDER, _host_fault),
    # A GPU it was placed on is quarantined there (left dirty by an earlier attempt).
    StopReason.STOP_REASON_GPU_QUARANTINED: Outcome(None, Fault.PROVIDER, _host_fault),
    # The registry unreachable from the host (its network, DNS) or failing: the host's fault,
    # retried on another host. An image the registry does not know is IMAGE_UNAVAILABLE.
    StopReason.STOP_REASON_IMAGE_PULL_FAILED: Outcome(None, Fault.PROVIDER, _pull_failed),
    # An interactive session the user said is done (SessionService.FinishSession): a success,
    # charged the time it ran.
    StopReason.STOP_REASON_SESSION_DONE: Outcome(
        JobState.SUCCEEDED, Fault.NONE, lambda f: "done: ended by the user"
    ),
}

# The strings daemons of earlier releases wrote (legacy_stop_reason, and "upload_failed" at
# the head of `reason`) and the reason each meant: the one place those strings are read.
LEGACY_NAMES: Mapping[str, Reason] = {
    "cancelled": StopReason.STOP_REASON_CANCELLED,
    "timed_out": StopReason.STOP_REASON_TIMED_OUT,
    "budget_exhausted": StopReason.STOP_REASON_BUDGET_EXHAUSTED,
    "host_error": StopReason.STOP_REASON_HOST_ERROR,
    "daemon_restarted": StopReason.STOP_REASON_DAEMON_RESTARTED,
    "upload_failed": StopReason.STOP_REASON_UPLOAD_FAILED,
}
# The text of a CancelCommand for each reason the control plane stops a job for (daemons of
# earlier releases read "budget_exhausted" in it).
CANCEL_TEXTS: Mapping[Reason, str] = {
    StopReason.STOP_REASON_CANCELLED: "cancelled",
    StopReason.STOP_REASON_BUDGET_EXHAUSTED: "budget_exhausted",
    StopReason.STOP_REASON_HOLD_EXPIRED: "hold expired",
    StopReason.STOP_REASON_SPENDING_LIMIT: "spending limit reached",
    StopReason.STOP_REASON_SESSION_DONE: "session done",
    StopReason.STOP_REASON_TIMED_OUT: "session expired",
}


@dataclass(frozen=True, slots=True)
class Ending:
    """How one terminal report ends its attempt."""

    reason: Reason
    state: JobState | None
    fault: Fault
    text: str

    @property
    def void(self) -> bool:
        """The provider's fault: the attempt is lost (not charged, the job retried)."""
        return self.fault is Fault.PROVIDER


def ending_of(report: messaging_pb2.JobReport, job: CancelState) -> Ending:
    """The ending of a terminal report (FINISHED, STOPPED or FAILED_TO_START) for `job`."""
    reason, detail = report.stop_reason, report.reason
    if reason not in OUTCOMES:  # unspecified, or newer than this release
        reason, detail = _legacy(report, job)
    elif OUTCOMES[reason].fault is Fault.PROVIDER and not detail:
        detail = StopReason.Name(reason).removeprefix("STOP_REASON_").lower()
    outcome = OUTCOMES[reason]
    exit_code = report.exit_code if report.HasField("exit_code") else None
    text = outcome.text(Facts(detail, exit_code, job))
    return Ending(reason, outcome.state, outcome.fault, text)


def _legacy(report: messaging_pb2.JobReport, job: CancelState) -> tuple[Reason, str]:
    """(reason, detail) of a report that carries no StopReason (a daemon of an earlier
    release, or a reason this release does not know), from its strings and flags."""
    named = LEGACY_NAMES.get(report.legacy_stop_reason)
    head, _, rest = report.reason.partition(":")
    said = LEGACY_NAMES.get(head.strip())
    if report.legacy_provider_fault:
        if named is None or OUTCOMES[named].fault is not Fault.PROVIDER:
            named = StopReason.STOP_REASON_HOST_ERROR
        return named, report.reason or report.legacy_stop_reason
    if report.kind == Kind.JOB_REPORT_KIND_FAILED_TO_START:
        # Which step failed (image, inputs, container, deadline) is in its text alone.
        return StopReason.STOP_REASON_CONTAINER_ERROR, report.reason
    if (
        named == StopReason.STOP_REASON_CANCELLED
        and said == StopReason.STOP_REASON_BUDGET_EXHAUSTED
    ):
        # A daemon that reported every stop asked for as "cancelled": the budget stop it was,
        # unless the user had asked to cancel too.
        if not job.cancel_requested:
            return StopReason.STOP_REASON_BUDGET_EXHAUSTED, ""
    if named is not None:
        return named, report.reason
    if report.kind == Kind.JOB_REPORT_KIND_STOPPED:
        if job.cancel_requested:
            return StopReason.STOP_REASON_CANCELLED, report.reason
        return StopReason.STOP_REASON_HOST_ERROR, report.reason
    if report.oom_killed:
        return StopReason.STOP_REASON_OOM_KILLED, ""
    if said == StopReason.STOP_REASON_UPLOAD_FAILED:
        return StopReason.STOP_REASON_UPLOAD_FAILED, rest.strip()
    if report.HasField("exit_code") and report.exit_code == 0:
        return StopReason.STOP_REASON_COMPLETED, ""
    return StopReason.STOP_REASON_EXITED_WITH_ERROR, ""
