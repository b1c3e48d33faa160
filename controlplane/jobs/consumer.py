"""Durable pull consumer of the EVENTS stream: applies daemon reports to jobs, acks after."""

from __future__ import annotations

import logging

import nats.errors
from google.protobuf.message import DecodeError
from gpuplane.v1 import messaging_pb2
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from controlplane.errors import Conflict
from controlplane.jobs.service import JobService
from messaging.subjects import EVENTS_DURABLE, EVENTS_STREAM

log = logging.getLogger(__name__)


class ReportConsumer:
    def __init__(self, js: JetStreamContext, jobs: JobService, batch: int = 64) -> None:
        self.js = js
        self.jobs = jobs
        self.batch = batch
        self._sub: JetStreamContext.PullSubscription | None = None

    async def subscribe(self) -> None:
        self._sub = await self.js.pull_subscribe(
            "gpuplane.events.*",
            durable=EVENTS_DURABLE,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_deliver=20, max_ack_pending=10_000
            ),
        )

    async def run_once(self, timeout: float = 1.0) -> int:
        """Fetches and applies one batch; returns how many messages were handled."""
        if self._sub is None:
            await self.subscribe()
        assert self._sub is not None
        try:
            messages = await self._sub.fetch(self.batch, timeout=timeout)
        except (nats.errors.TimeoutError, TimeoutError):
            # nats-py raises either, depending on where in the fetch the time ran out.
            return 0
        for message in messages:
            try:
                report = messaging_pb2.JobReport.FromString(message.data)
            except DecodeError:
                log.error("undecodable job report on %s dropped", message.subject)
                await message.term()
                continue
            try:
                await self.jobs.apply_report(report)
            except Conflict:
                await message.nak(delay=0.2)
                continue
            except Exception:  # noqa: BLE001 - keep consuming; the message is redelivered
                log.exception("applying report %s/%s failed", report.job_id, report.attempt)
                await message.nak(delay=1.0)
                continue
            await message.ack()
        return len(messages)
