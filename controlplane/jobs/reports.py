"""Daemon reports applied to jobs and attempts: fencing, metered charging, budget stop."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

from gpuplane.v1 import messaging_pb2, registry_pb2, types_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.jobs.billing import StopReason
from controlplane.jobs.clock import ForeignReport, RefusedReport, check_seq, observed_run_time
from controlplane.jobs.lost import LostAttempts
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.outcomes import Ending, ending_of
from controlplane.jobs.provenance import countersign_attempt, keep_host_part
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.repository_endings import EndingRows
from controlplane.jobs.states import (
    ATTEMPT_ENDING,
    AttemptState,
    JobState,
    note_job_event,
    set_attempt_state,
    set_job_state,
)
from controlplane.ledger.batch import GroupCommit
from controlplane.registry.repository import RegistryRepository
from controlplane.strings import scrub_text
from messaging.signing import SigningKey

log = logging.getLogger(__name__)
__all__ = ["ForeignReport", "RefusedReport", "Reports"]
Kind = messaging_pb2.JobReportKind
TERMINAL_REPORTS = frozenset(
    {
        Kind.JOB_REPORT_KIND_FINISHED,
        Kind.JOB_REPORT_KIND_STOPPED,
        Kind.JOB_REPORT_KIND_FAILED_TO_START,
    }
)
# States in which a job still runs up cost on its host.
RUNS_UP_COST = frozenset({JobState.SCHEDULED, JobState.STARTING, JobState.RUNNING})
# Reports whose run time is charged at once (metering), while the container runs. UPLOADING's
# is not: the container has ended, and the terminal report that follows settles the hold
# with the whole run's cost anyway (a charge there cost a ledger post per job for nothing).
METERED_REPORTS = frozenset({Kind.JOB_REPORT_KIND_RUNNING, Kind.JOB_REPORT_KIND_USAGE})


@dataclass(frozen=True, slots=True)
class _Applied:
    """What applying a report changed, for the work done after its transaction commits."""

    job_id: str
    changed: bool
    live: bool
    command: registry_pb2.ControlMessage | None


@dataclass(frozen=True, slots=True)
class Incoming:
    """A report to apply, with the host its subject names (None: a host-less subject)."""

    report: messaging_pb2.JobReport
    subject_host: str | None


class Reports(LostAttempts):
    """Part of JobService: daemon reports."""

    # Countersigns each settled attempt's provenance (server.py sets it; None: none made).
    provenance_key: SigningKey | None = None

    @cached_property
    def terminal_reports(self) -> GroupCommit[Incoming, _Applied | None]:
        """Concurrent terminal reports, applied in batches of one transaction each. A second
        batch starts beside a running one only with 32 reports or more: batches on the same
        hosts and the one platform fee account take their locks one after the other anyway,
        and a batch's fixed cost (its round trips, the scheduling cycle the GPUs it frees
        wake) is most of what a small one costs (job_settlements_per_s: batches of 16, two at
        a time, cost 1.5-2x the CPU per settlement of batches of 32, one at a time)."""
        return GroupCommit(self._apply_batch, max_batch=64, min_batch=32)

    @cached_property
    def progress_reports(self) -> GroupCommit[Incoming, _Applied | None]:
        """Concurrent reports that do not end their attempt (STARTING, RUNNING, UPLOADING,
        USAGE), applied in batches of one transaction each, apart from the terminal ones
        (whose batches settle holds). Three of them per job otherwise cost a transaction
        each; the report consumer applies a fetched batch's jobs at once, so those of jobs
        starting and ending together share one. A lone report still runs at once."""
        return GroupCommit(self._apply_batch, max_batch=64, min_batch=1)

    async def apply_report(
        self, report: messaging_pb2.JobReport, subject_host: str | None = None
    ) -> bool:
        """Applies one daemon report idempotently; False when it was stale or a duplicate.
        `subject_host` is the host its subject names (None: the host-less subject of earlier
        releases); ForeignReport when it, or the report's own host_id, is not the attempt's.
        Concurrent terminal reports share a transaction (`terminal_reports`, group commit),
        whose holds settle in one `settle_many`; concurrent others share one of their own
        (`progress_reports`)."""
        if subject_host is not None and report.host_id != subject_host:
            raise ForeignReport(f"report names host {report.host_id!r}")
        scrub_text(report)  # its reason and manifest are stored; PostgreSQL refuses NUL
        incoming = Incoming(report, subject_host)
        if report.kind in TERMINAL_REPORTS:
            applied = await self.terminal_reports(incoming)
        else:
            applied = await self.progress_reports(incoming)
        return self._announce(report.host_id, applied)

    async def _apply_batch(self, batch: Sequence[Incoming]) -> list[_Applied | None | Exception]:
        """One transaction for the batch; should it fail as a whole (one report's error, a
        conflict), each report runs alone so only that one fails."""
        try:
            return list(await self.db.run(lambda s: self._apply_reports(s, batch)))
        except Exception:
            if len(batch) == 1:
                raise
        return [await self._apply_alone(incoming) for incoming in batch]

    async def _apply_alone(self, incoming: Incoming) -> _Applied | None | Exception:
        try:
            (applied,) = await self.db.run(lambda s: self._apply_reports(s, [incoming]))
        except Exception as error:  # noqa: BLE001 - handed to that report's caller
            return error
        return applied

    async def _apply_reports(
        self, session: AsyncSession, batch: Sequence[Incoming]
    ) -> list[_Applied | None]:
        """Applies reports in one transaction, each in turn, then finishes the attempts they
        ended together (GPUs, hosts, holds: a few statements for the whole batch). Terminal
        reports that plainly end their attempt (neither lost nor retried, the only report of
        their job here) work on rows read detached and written back set-based
        (repository_endings.py); the others on rows loaded into the session."""
        now = utcnow()
        rows = EndingRows(session)
        found = await rows.lock_ending(
            {
                (i.report.job_id, i.report.attempt)
                for i in batch
                if i.report.kind in TERMINAL_REPORTS
            }
        )
        per_job = Counter(i.report.job_id for i in batch)
        plain: dict[int, tuple[Job, JobAttempt]] = {}
        for n, incoming in enumerate(batch):
            pair = found.get((incoming.report.job_id, incoming.report.attempt))
            if pair is not None and per_job[incoming.report.job_id] == 1:
                if _ends_plainly(*pair, incoming.report):
                    plain[n] = pair
        ended: list[tuple[Job, JobAttempt]] = []
        loaded = [incoming for n, incoming in enumerate(batch) if n not in plain]
        results = iter(await self._apply_loaded(session, loaded, now, ended) if loaded else [])
        applied: list[_Applied | None] = []
        for n, incoming in enumerate(batch):
            if n not in plain:
                applied.append(next(results))
                continue
            job, attempt = plain[n]
            applied.append(await self._apply_one(session, rows, job, attempt, incoming, now, ended))
        await self._finish_attempts(session, ended, now, rows.holds)
        if self.provenance_key is not None:  # settled: its charge is known
            for job, attempt in ended:
                await countersign_attempt(session, job, attempt, self.provenance_key, now)
        # The last writes: with nothing loaded into the session, they carry the COMMIT.
        await rows.write_ended(list(plain.values()), commit=not loaded and not session.new)
        return applied

    async def _apply_loaded(
        self,
        session: AsyncSession,
        batch: Sequence[Incoming],
        now: datetime,
        ended: list[tuple[Job, JobAttempt]],
    ) -> list[_Applied | None]:
        """Applies reports on their jobs and attempts loaded into the session (locked in one
        statement each, id order); the attempts they end are added to `ended`."""
        repo = JobRepository(session)
        jobs = await repo.lock_jobs({i.report.job_id for i in batch})
        attempts = await repo.lock_attempts({(i.report.job_id, i.report.attempt) for i in batch})
        applied: list[_Applied | None] = []
        for incoming in batch:
            report = incoming.report
            job = jobs.get(report.job_id)
            attempt = attempts.get((report.job_id, report.attempt))
            if job is None or attempt is None:
                ids = {"job_id": report.job_id, "attempt": report.attempt}
                log.warning("report for unknown attempt %s/%s", *ids.values(), extra=ids)
                applied.append(None)
                continue
            applied.append(await self._apply_one(session, repo, job, attempt, incoming, now, ended))
        return applied

    async def _apply_one(
        self,
        session: AsyncSession,
        repo: JobRepository,
        job: Job,
        attempt: JobAttempt,
        incoming: Incoming,
        now: datetime,
        ended: list[tuple[Job, JobAttempt]],
    ) -> _Applied | None:
        """One report on its locked job and attempt; an attempt it ends (and does not retry)
        is added to `ended`, to be finished with the batch."""
        report = incoming.report
        if not _admitted(job, attempt, report, incoming.subject_host):
            return None
        keep_host_part(attempt, report)
        noted = False
        if report.run_time_ms:
            noted = await self._take_run_time(session, repo, job, attempt, report, now)
        resend: registry_pb2.ControlMessage | None = None
        ending = ending_of(report, job) if report.kind in TERMINAL_REPORTS else None
        if ending is not None and ending.reason == StopReason.STOP_REASON_BUDGET_EXHAUSTED:
            _ran_its_budget(attempt, now)
        retried = ending is not None and (ending.void or _retried_exit(job, report, ending))
        if ending is not None and ending.void:
            await self._lose_attempt(session, repo, job, attempt, ending.text, now)
            changed = True
        elif ending is not None and retried:
            attempt.manifest = _manifest(report)  # what the failed attempt stored
            await self._retry_failed_attempt(
                session, repo, job, attempt, ending.text, report.exit_code, now
            )
            changed = True
        else:
            changed = self._apply(repo, job, attempt, report, ending, now)
            if report.kind in METERED_REPORTS and attempt.run_time_ms:
                charged = await self._meter(session, job, attempt)
                if charged.exhausted and JobState(job.state) in RUNS_UP_COST:
                    resend = self._cancel_command(job, StopReason.STOP_REASON_BUDGET_EXHAUSTED)
        # The attempt ended with this report and was not retried (lost or failed and
        # requeued, or the job failed after its last retry: settled there).
        if JobState(job.state).terminal and not retried:
            ended.append((job, attempt))
        elif job.cancel_requested and report.kind in (
            Kind.JOB_REPORT_KIND_STARTING,
            Kind.JOB_REPORT_KIND_RUNNING,
        ):
            resend = self._cancel_command(job, text=job.state_reason)
        if resend is not None:
            await self._command(session, job, resend, now)
        return _Applied(job.id, changed or noted, attempt.live, resend)

    async def _take_run_time(
        self,
        session: AsyncSession,
        repo: JobRepository,
        job: Job,
        attempt: JobAttempt,
        report: messaging_pb2.JobReport,
        now: datetime,
    ) -> bool:
        """Takes the report's run time, capped at what the control plane observed (+ slack).
        A capped report is counted (`on_report_capped`); an attempt's first one is recorded
        as an event on the job and costs its host reliability. True when an event was
        recorded."""
        run = observed_run_time(attempt, report.run_time_ms, now, self.policy.run_time_slack)
        attempt.run_time_ms = max(attempt.run_time_ms, run.taken_ms)
        if not run.capped:
            return False
        if self.on_report_capped is not None:
            self.on_report_capped()
        attempt.capped_reports += 1
        log.warning(
            "%s/%s: host %s reported %d ms of run time, %d ms observed: capped",
            job.id,
            attempt.attempt,
            attempt.host_id,
            run.claimed_ms,
            run.observed_ms,
        )
        if attempt.capped_reports > 1:
            return False
        # One bad outcome, through the writer that locks the host row (as batches do).
        await RegistryRepository(session).note_outcomes([(attempt.host_id, False)], now)
        text = (
            f"attempt {attempt.attempt}: its host reported {run.claimed_ms} ms of run time; "
            f"the control plane observed {run.observed_ms} ms (+{run.slack_ms} ms slack): "
            f"capped at {run.taken_ms} ms"
        )
        note_job_event(repo, job, text, now=now)
        return True

    def _announce(self, host_id: str, applied: _Applied | None) -> bool:
        """After the report's transaction committed: the command it calls for is sent, and
        watchers (and the scheduler, when GPUs were freed) are told."""
        if applied is None:
            return False
        if applied.command is not None:
            self.streams.wake(host_id)  # stored with the report's transaction
        if applied.changed:
            self.notifier.job_changed(applied.job_id)
            if not applied.live:
                self.notifier.gpus_changed(freed=True)
        return True

    def _apply(
        self,
        repo: JobRepository,
        job: Job,
        attempt: JobAttempt,
        report: messaging_pb2.JobReport,
        ending: Ending | None,
        now: datetime,
    ) -> bool:
        exit_code = report.exit_code if report.HasField("exit_code") else None
        if exit_code is not None:
            attempt.exit_code = exit_code
        kind = report.kind
        if kind == Kind.JOB_REPORT_KIND_STARTING:
            set_attempt_state(attempt, AttemptState.STARTING, now=now)
            return set_job_state(
                repo, job, JobState.STARTING, reason="preparing image and inputs", now=now
            )
        if kind == Kind.JOB_REPORT_KIND_RUNNING:
            set_attempt_state(attempt, AttemptState.RUNNING, now=now)
            attempt.started_at = attempt.started_at or now
            job.started_at = job.started_at or now
            return set_job_state(repo, job, JobState.RUNNING, now=now)
        if kind == Kind.JOB_REPORT_KIND_USAGE:
            return False
        if kind == Kind.JOB_REPORT_KIND_UPLOADING:
            set_attempt_state(attempt, AttemptState.UPLOADING, now=now)
            return set_job_state(
                repo,
                job,
                JobState.UPLOADING,
                reason="storing outputs and logs",
                exit_code=exit_code,
                now=now,
            )
        if ending is None or ending.state is None:
            log.warning("report of unknown kind %s for %s ignored", kind, job.id)
            return False
        if kind == Kind.JOB_REPORT_KIND_FINISHED:
            attempt.manifest = _manifest(report)
        target, reason = ending.state, ending.text
        set_attempt_state(attempt, ATTEMPT_ENDING[target], reason=reason, now=now)
        return set_job_state(repo, job, target, reason=reason, exit_code=exit_code, now=now)


def _ran_its_budget(attempt: JobAttempt, now: datetime) -> None:
    """An attempt stopped for its budget ran the budget's whole run time when the control
    plane's own clock says so (Docker's run time can end a few ms short of the daemon's
    deadline): it is then charged exactly its budget (billing.budget_charge)."""
    if attempt.budget_ms is None or attempt.started_at is None:
        return
    if now - attempt.started_at >= timedelta(milliseconds=attempt.budget_ms):
        attempt.run_time_ms = max(attempt.run_time_ms, attempt.budget_ms)


def _ends_plainly(job: Job, attempt: JobAttempt, report: messaging_pb2.JobReport) -> bool:
    """A terminal report that, if admitted, ends its attempt without losing or retrying it:
    nothing but the job, the attempt and their events change (besides billing)."""
    if report.kind not in TERMINAL_REPORTS:
        return False
    ending = ending_of(report, job)
    return not ending.void and not _retried_exit(job, report, ending)


def _retried_exit(job: Job, report: messaging_pb2.JobReport, ending: Ending) -> bool:
    """A non-zero exit whose code the spec lists in retry_on_exit_codes (and no cancel was
    asked for): the attempt is retried like a lost one, but charged."""
    if ending.reason != StopReason.STOP_REASON_EXITED_WITH_ERROR or job.cancel_requested:
        return False
    spec = types_pb2.JobSpec.FromString(job.spec)
    return report.HasField("exit_code") and report.exit_code in spec.retry_on_exit_codes


def _manifest(report: messaging_pb2.JobReport) -> list[dict[str, object]]:
    return [
        {"key": o.key, "path": o.path, "size_bytes": o.size_bytes, "sha256": o.sha256}
        for o in report.manifest
    ]


def _admitted(
    job: Job, attempt: JobAttempt, report: messaging_pb2.JobReport, subject_host: str | None
) -> bool:
    """Fencing: only the live attempt on its own host may change the job, and only with a
    report whose seq passes clock.check_seq (newer, not implausibly far ahead; a terminal
    report whatever its seq)."""
    if subject_host is not None and attempt.host_id != subject_host:
        raise ForeignReport(f"the attempt ran on host {attempt.host_id!r}")
    if not attempt.live or attempt.host_id != report.host_id or job.attempt != attempt.attempt:
        log.info("stale report for %s/%s ignored", job.id, attempt.attempt)
        return False
    return check_seq(attempt, report.seq, report.kind in TERMINAL_REPORTS)
