"""The one table from a terminal report's StopReason to the job's end, and the translation of
the strings that daemons of earlier releases sent instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from gpuplane.v1 import messaging_pb2

from controlplane.jobs.outcomes import OUTCOMES, Fault, ending_of

K = messaging_pb2.JobReportKind
R = messaging_pb2.StopReason
FINISHED, STOPPED, NOT_STARTED = (
    K.JOB_REPORT_KIND_FINISHED,
    K.JOB_REPORT_KIND_STOPPED,
    K.JOB_REPORT_KIND_FAILED_TO_START,
)


@dataclass
class FakeJob:
    cancel_requested: bool = False
    state_reason: str = ""


ASKED = FakeJob(cancel_requested=True, state_reason="cancel requested: hold expired")
# None: the attempt is void (a provider's fault), the job requeued or failed by its retries.
End = tuple[str | None, str]


def end_of(kind: int, job: FakeJob | None = None, **fields: Any) -> End:
    report = messaging_pb2.JobReport(kind=kind, **fields)  # type: ignore[arg-type]
    ending = ending_of(report, job or FakeJob())
    assert ending.void == (ending.state is None)
    return (ending.state.value if ending.state else None), ending.text


def test_every_reason_has_one_outcome_and_only_providers_void_an_attempt() -> None:
    named = {v for v in R.values() if v != R.STOP_REASON_UNSPECIFIED}
    assert set(OUTCOMES) == named
    for reason, outcome in OUTCOMES.items():
        assert (outcome.state is None) == (outcome.fault is Fault.PROVIDER), R.Name(reason)


@pytest.mark.parametrize(
    ("kind", "fields", "job", "end"),
    [
        (
            FINISHED,
            {"stop_reason": R.STOP_REASON_COMPLETED, "exit_code": 0},
            None,
            ("succeeded", ""),
        ),
        (
            FINISHED,
            {"stop_reason": R.STOP_REASON_EXITED_WITH_ERROR, "exit_code": 3},
            None,
            ("failed", "exit code 3"),
        ),
        (
            FINISHED,
            {"stop_reason": R.STOP_REASON_OOM_KILLED, "exit_code": 137},
            None,
            ("failed", "oom"),
        ),
        (
            FINISHED,
            {"stop_reason": R.STOP_REASON_TIMED_OUT, "exit_code": 137},
            ASKED,
            ("timed_out", "ran past max_duration_seconds"),
        ),
        (
            FINISHED,
            {"stop_reason": R.STOP_REASON_UPLOAD_FAILED},
            None,
            ("failed", "upload_failed: outputs could not be stored"),
        ),
        (
            FINISHED,
            {"stop_reason": R.STOP_REASON_OUTPUT_TOO_LARGE, "reason": "too big"},
            None,
            ("failed", "upload_failed: too big"),
        ),
        (
            NOT_STARTED,
            {"stop_reason": R.STOP_REASON_IMAGE_UNAVAILABLE, "reason": "no image"},
            None,
            ("failed", "no image"),
        ),
        (
            NOT_STARTED,
            {"stop_reason": R.STOP_REASON_INPUT_UNAVAILABLE},
            None,
            ("failed", "the job could not start"),
        ),
        (
            NOT_STARTED,
            {"stop_reason": R.STOP_REASON_DISPATCH_EXPIRED, "reason": "late"},
            None,
            ("failed", "late"),
        ),
        (STOPPED, {"stop_reason": R.STOP_REASON_CANCELLED}, None, ("cancelled", "cancelled")),
        (
            STOPPED,
            {"stop_reason": R.STOP_REASON_HOLD_EXPIRED},
            ASKED,
            ("cancelled", ASKED.state_reason),
        ),
        (
            STOPPED,
            {"stop_reason": R.STOP_REASON_ORPHANED, "reason": "orphaned: ..."},
            None,
            ("cancelled", "cancelled"),
        ),
        (
            STOPPED,
            {"stop_reason": R.STOP_REASON_BUDGET_EXHAUSTED},
            ASKED,
            ("failed", "budget_exhausted"),
        ),
        (
            STOPPED,
            {"stop_reason": R.STOP_REASON_HOST_ERROR, "reason": "host error: boom"},
            None,
            (None, "host fault: host error: boom"),
        ),
        (
            STOPPED,
            {"stop_reason": R.STOP_REASON_DAEMON_RESTARTED},
            None,
            (None, "host fault: daemon_restarted"),
        ),
        (
            NOT_STARTED,
            {"stop_reason": R.STOP_REASON_GPUS_MISSING, "reason": "no GPU x"},
            None,
            (None, "host fault: no GPU x"),
        ),
    ],
)
def test_typed_reports(kind: int, fields: dict[str, Any], job: FakeJob | None, end: End) -> None:
    assert end_of(kind, job, **fields) == end


@pytest.mark.parametrize(
    ("kind", "fields", "job", "end"),
    [
        (FINISHED, {"exit_code": 0}, None, ("succeeded", "")),
        (FINISHED, {"exit_code": 7}, None, ("failed", "exit code 7")),
        (FINISHED, {"exit_code": 137, "oom_killed": True}, None, ("failed", "oom")),
        (
            FINISHED,
            {"exit_code": 137, "legacy_stop_reason": "timed_out"},
            None,
            ("timed_out", "ran past max_duration_seconds"),
        ),
        (
            FINISHED,
            {"exit_code": 0, "reason": "upload_failed"},
            None,
            ("failed", "upload_failed: outputs could not be stored"),
        ),
        (
            FINISHED,
            {"exit_code": 0, "reason": "upload_failed: too big"},
            None,
            ("failed", "upload_failed: too big"),
        ),
        (NOT_STARTED, {"reason": "no image"}, None, ("failed", "no image")),
        (NOT_STARTED, {}, None, ("failed", "the job could not start")),
        (STOPPED, {"legacy_stop_reason": "cancelled"}, None, ("cancelled", "cancelled")),
        (STOPPED, {"legacy_stop_reason": "cancelled"}, ASKED, ("cancelled", ASKED.state_reason)),
        (
            STOPPED,
            {"legacy_stop_reason": "budget_exhausted"},
            ASKED,
            ("failed", "budget_exhausted"),
        ),
        (
            STOPPED,
            {"legacy_stop_reason": "cancelled", "reason": "budget_exhausted"},
            None,
            ("failed", "budget_exhausted"),
        ),
        (
            STOPPED,
            {"legacy_stop_reason": "cancelled", "reason": "budget_exhausted"},
            ASKED,
            ("cancelled", ASKED.state_reason),
        ),
        (
            STOPPED,
            {
                "legacy_stop_reason": "host_error",
                "reason": "host error: boom",
                "legacy_provider_fault": True,
            },
            None,
            (None, "host fault: host error: boom"),
        ),
        (
            STOPPED,
            {"legacy_stop_reason": "daemon_restarted", "legacy_provider_fault": True},
            None,
            (None, "host fault: daemon_restarted"),
        ),
        (
            NOT_STARTED,
            {"reason": "this host has no GPU x", "legacy_provider_fault": True},
            None,
            (None, "host fault: this host has no GPU x"),
        ),
    ],
)
def test_reports_of_earlier_daemon_releases(
    kind: int, fields: dict[str, Any], job: FakeJob | None, end: End
) -> None:
    assert end_of(kind, job, **fields) == end
