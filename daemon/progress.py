"""How far one attempt has got on this host: one enum for the executor, the journal and the
reports (each step is reported as the JobReportKind of the same name)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from gpuplane.v1 import messaging_pb2, types_pb2

Kind = messaging_pb2.JobReportKind


class Progress(StrEnum):
    """An attempt's step until its terminal report (after which its journal entry is gone).
    The values are what the journal has always written (the name of the last report's kind),
    so a restarted daemon reads the entries of earlier runs as they are."""

    # The dispatch is taken and journaled; nothing is reported yet.
    ACCEPTED = "ACCEPTED"
    # Inputs, image and container are being prepared.
    STARTING = "JOB_REPORT_KIND_STARTING"
    # The container runs (run-time reports repeat).
    RUNNING = "JOB_REPORT_KIND_RUNNING"
    # The container has exited; its outputs and logs are being stored.
    UPLOADING = "JOB_REPORT_KIND_UPLOADING"

    @property
    def job_state(self) -> types_pb2.JobState.ValueType:
        """The job state this step is shown as to the control plane (RunningJob.state)."""
        return _JOB_STATES[self]

    @property
    def report_kind(self) -> messaging_pb2.JobReportKind.ValueType:
        """The report that announces this step (ACCEPTED has none)."""
        return _REPORT_KINDS[self]

    @classmethod
    def journaled(cls, text: str) -> Progress | None:
        """The step a journal entry records; None when the text is not one."""
        return _JOURNALED.get(text)


_JOB_STATES: Mapping[Progress, types_pb2.JobState.ValueType] = {
    Progress.ACCEPTED: types_pb2.JOB_STATE_STARTING,
    Progress.STARTING: types_pb2.JOB_STATE_STARTING,
    Progress.RUNNING: types_pb2.JOB_STATE_RUNNING,
    Progress.UPLOADING: types_pb2.JOB_STATE_UPLOADING,
}
_REPORT_KINDS: Mapping[Progress, messaging_pb2.JobReportKind.ValueType] = {
    Progress.ACCEPTED: Kind.JOB_REPORT_KIND_UNSPECIFIED,
    Progress.STARTING: Kind.JOB_REPORT_KIND_STARTING,
    Progress.RUNNING: Kind.JOB_REPORT_KIND_RUNNING,
    Progress.UPLOADING: Kind.JOB_REPORT_KIND_UPLOADING,
}
# Journals of earlier runs also name a run-time (USAGE) report, which was sent while RUNNING.
_JOURNALED: Mapping[str, Progress] = {p.value: p for p in Progress} | {
    Kind.Name(Kind.JOB_REPORT_KIND_USAGE): Progress.RUNNING
}
