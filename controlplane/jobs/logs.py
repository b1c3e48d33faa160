"""Job logs: live from the JetStream LOGS stream while an attempt runs, from S3 after.
Object-store and NATS failures propagate: the API maps them to UNAVAILABLE."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats.errors
from gpuplane.v1 import jobs_pb2, types_pb2
from nats.js.api import DeliverPolicy

from controlplane.bus import Bus
from controlplane.db.engine import Database
from controlplane.jobs.models import Job, JobAttempt
from controlplane.jobs.repository import JobRepository
from messaging.subjects import LOG_END_HEADER, LOG_STREAM_HEADER, logs_subject
from storage.layout import attempt_prefix, inside
from storage.objects import ObjectStore

STREAMS: dict[str, types_pb2.LogStream.ValueType] = {
    "stdout": types_pb2.LOG_STREAM_STDOUT,
    "stderr": types_pb2.LOG_STREAM_STDERR,
}


def _tail(data: bytes, lines: int) -> bytes:
    if not lines:
        return data
    parts = data.splitlines(keepends=True)
    return b"".join(parts[-lines:])


class LogReader:
    def __init__(self, db: Database, bus: Bus, store: ObjectStore) -> None:
        self.db = db
        self.bus = bus
        self.store = store

    async def read(
        self, job: Job, attempt: JobAttempt, request: jobs_pb2.StreamLogsRequest
    ) -> AsyncIterator[jobs_pb2.LogChunk]:
        prefix = attempt_prefix(job.id, attempt.attempt)
        stored = {
            e["path"]: e["key"] for e in attempt.manifest if inside(str(e.get("key", "")), prefix)
        }
        if not attempt.live and not request.follow and "logs/stdout" in stored:
            async for chunk in self._from_storage(attempt, stored, request):
                yield chunk
            return
        async for chunk in self._from_stream(job, attempt, request):
            yield chunk

    async def _from_storage(
        self, attempt: JobAttempt, stored: dict[str, str], request: jobs_pb2.StreamLogsRequest
    ) -> AsyncIterator[jobs_pb2.LogChunk]:
        for name, stream in STREAMS.items():
            if request.stream not in (types_pb2.LOG_STREAM_UNSPECIFIED, stream):
                continue
            key = stored.get(f"logs/{name}")
            if key is None:
                continue
            data = _tail(await self.store.get_bytes(key), request.tail_lines)
            for start in range(0, len(data), 64 * 1024):
                yield jobs_pb2.LogChunk(
                    stream=stream, data=data[start : start + 64 * 1024], attempt=attempt.attempt
                )

    async def _attempt_live(self, job_id: str, attempt: int) -> bool:
        async with self.db.read() as session:
            row = await JobRepository(session).attempt(job_id, attempt)
        return row is not None and row.live

    async def _from_stream(
        self, job: Job, attempt: JobAttempt, request: jobs_pb2.StreamLogsRequest
    ) -> AsyncIterator[jobs_pb2.LogChunk]:
        js = await self.bus.jetstream(timeout=5)
        subscription = await js.subscribe(
            logs_subject(attempt.host_id, job.id, attempt.attempt),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            while True:
                try:
                    message = await subscription.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    if not request.follow or not await self._attempt_live(job.id, attempt.attempt):
                        return
                    continue
                headers = message.headers or {}
                if headers.get(LOG_END_HEADER):
                    return
                stream = STREAMS.get(
                    headers.get(LOG_STREAM_HEADER, "stdout"), types_pb2.LOG_STREAM_STDOUT
                )
                if request.stream in (types_pb2.LOG_STREAM_UNSPECIFIED, stream):
                    yield jobs_pb2.LogChunk(
                        stream=stream, data=message.data, attempt=attempt.attempt
                    )
                pending = message.metadata.num_pending if message.metadata else 1
                if not request.follow and pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
