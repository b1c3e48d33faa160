"""Durable pull consumer of the EVENTS stream: applies daemon reports to jobs, acks after."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

import nats.errors
from google.protobuf.message import DecodeError
from gpuplane.v1 import messaging_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from controlplane.errors import Conflict
from controlplane.jobs.clock import ForeignReport, RefusedReport
from controlplane.jobs.service import JobService
from controlplane.jobs.signatures import NO_HOST_KEY, ReportSignatures
from messaging.jsonlog import log_fields
from messaging.signing import SIGNATURE_HEADER
from messaging.subjects import (
    EVENTS_DURABLE,
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    host_of_events_subject,
)

log = logging.getLogger(__name__)


class ReportConsumer:
    """Applies reports from gpuplane.events.<host>.<job>. A refused report (its subject's
    host is not its attempt's host, it is not signed by that host's key (jobs/signatures.py),
    or its seq jumps implausibly far) is dropped and counted (`refused` by reason, `foreign`,
    and `on_dropped`)."""

    def __init__(
        self,
        js: JetStreamContext,
        jobs: JobService,
        batch: int = 64,
        on_dropped: Callable[[str], None] | None = None,
        signatures: ReportSignatures | None = None,
    ) -> None:
        self.js = js
        self.jobs = jobs
        self.signatures = signatures
        self.batch = batch
        self.on_dropped = on_dropped
        self.foreign = 0
        # Refused reports by reason (clock.RefusedReport.reason, foreign ones included, and
        # jobs/signatures.py's refusals).
        self.refused: Counter[str] = Counter()
        self._sub: JetStreamContext.PullSubscription | None = None

    async def subscribe(self) -> None:
        config = ConsumerConfig(
            durable_name=EVENTS_DURABLE,
            name=EVENTS_DURABLE,
            filter_subject=EVENTS_SUBJECTS,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_deliver=20,
            max_ack_pending=10_000,
        )
        # Create or update: a durable of an earlier release filtered gpuplane.events.*, which
        # the host-scoped subjects no longer match.
        await self.js.add_consumer(EVENTS_STREAM, config)
        self._sub = await self.js.pull_subscribe_bind(EVENTS_DURABLE, stream=EVENTS_STREAM)

    async def run_once(self, timeout: float = 1.0) -> int:
        """Fetches and applies one batch; returns how many messages were handled. Each job's
        reports are applied in the order they came, different jobs' at once (so terminal
        reports of many jobs share transactions, JobService.terminal_reports)."""
        if self._sub is None:
            await self.subscribe()
        assert self._sub is not None
        try:
            messages = await self._sub.fetch(self.batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            # nats-py raises either, depending on where in the fetch the time ran out.
            return 0
        by_job: dict[str, list[tuple[Msg, messaging_pb2.JobReport]]] = {}
        for message in messages:
            if await self._refused(message):
                await message.term()
                continue
            try:
                report = messaging_pb2.JobReport.FromString(message.data)
            except DecodeError:
                log.error("undecodable job report on %s dropped", message.subject)
                await message.term()
                continue
            by_job.setdefault(report.job_id, []).append((message, report))
        await asyncio.gather(*(self._apply_in_order(reports) for reports in by_job.values()))
        return len(messages)

    async def _apply_in_order(self, reports: list[tuple[Msg, messaging_pb2.JobReport]]) -> None:
        for message, report in reports:
            await self._apply(message, report)

    async def _apply(self, message: Msg, report: messaging_pb2.JobReport) -> None:
        """Applies one report and acks it; a refused one (foreign, seq jump) is terminated, a
        failed one redelivered later. Each line logged meanwhile carries the report's ids."""
        host_id = host_of_events_subject(message.subject)
        with log_fields(job_id=report.job_id, attempt=report.attempt, host_id=host_id or ""):
            await self._apply_logged(message, report, host_id)

    async def _apply_logged(
        self, message: Msg, report: messaging_pb2.JobReport, host_id: str | None
    ) -> None:
        try:
            await self.jobs.apply_report(report, host_id)
        except RefusedReport as error:
            if isinstance(error, ForeignReport):
                self.foreign += 1
            self.refused[error.reason] += 1
            log.warning(
                "report for %s/%s on %s dropped: %s",
                report.job_id,
                report.attempt,
                message.subject,
                error,
            )
            if self.on_dropped is not None:
                self.on_dropped(error.reason)
            await message.term()
            return
        except Conflict:
            await message.nak(delay=0.2)
            return
        except Exception:  # noqa: BLE001 - keep consuming; the message is redelivered
            log.exception("applying report %s/%s failed", report.job_id, report.attempt)
            await message.nak(delay=1.0)
            return
        await message.ack()
        kind = messaging_pb2.JobReportKind.Name(report.kind)
        # Usage reports come every few seconds: only the ones that move the attempt at INFO.
        level = (
            logging.DEBUG if report.kind == messaging_pb2.JOB_REPORT_KIND_USAGE else logging.INFO
        )
        log.log(level, "report %s for %s/%s applied", kind, report.job_id, report.attempt)

    @property
    def refused_total(self) -> int:
        """How many reports were refused, for any reason."""
        return sum(self.refused.values())

    async def _refused(self, message: Msg) -> bool:
        """Whether the report is refused for its signature (counted and logged)."""
        if self.signatures is None:
            return False
        host = host_of_events_subject(message.subject)
        header = (message.headers or {}).get(SIGNATURE_HEADER)
        if host is None:
            reason = NO_HOST_KEY if self.signatures.required else None
        else:
            reason = await self.signatures.refusal(host, message.data, header)
        if reason is None:
            return False
        self.refused[reason] += 1
        log.warning("report on %s refused: %s", message.subject, reason)
        if self.on_dropped is not None:
            self.on_dropped(reason)
        return True
