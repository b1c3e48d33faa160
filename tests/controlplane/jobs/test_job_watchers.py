"""WatchJob's waits: a change this process did not make (another replica's, written to the
database without this process's notifier) still reaches a watcher within about a second,
and however many jobs are watched, that costs one read per second, not one per watcher; a
watcher's wake-up reads only the new events."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from controlplane.db.base import utcnow
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.service import JobService
from controlplane.jobs.states import note_job_event
from controlplane.jobs.watchers import JobWatchers
from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(120), pytest.mark.databases("sqlite", "postgresql")]

SPEC = types_pb2.JobSpec(
    image="gpuplane-test/busybox:1",
    command=["true"],
    gpu_count=1,
    max_duration_seconds=60,
    max_price_per_gpu_hour_micro_credits=1_000_000,
)


async def _submit(plane: JobPlane) -> str:
    request = jobs_pb2.SubmitJobRequest(spec=SPEC)
    reply = await plane.jobs.SubmitJob(request, metadata=plane.auth(plane.consumer_key))
    return str(reply.job.job_id)


async def _note_elsewhere(plane: JobPlane, job_id: str, text: str) -> None:
    """An event as another replica writes it: in the database, no wake-up in this process."""
    assert plane.plane.db is not None
    async with plane.plane.db.transaction() as session:
        repo = JobRepository(session)
        job = await repo.get(job_id)
        assert job is not None
        note_job_event(repo, job, text, now=utcnow())


async def test_another_replicas_event_reaches_every_watcher_by_one_read(
    plane: JobPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    original = JobWatchers._event_seqs

    async def counted(self: JobWatchers, job_ids: list[str]) -> dict[str, int]:
        reads.append(len(job_ids))
        return await original(self, job_ids)

    monkeypatch.setattr(JobWatchers, "_event_seqs", counted)
    job_ids = [await _submit(plane) for _ in range(5)]
    consumer = plane.auth(plane.consumer_key)
    streams = [
        plane.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=j), metadata=consumer) for j in job_ids
    ]
    for stream in streams:
        first = await stream.read()
        assert isinstance(first, types_pb2.JobEvent)
        assert first.state == types_pb2.JOB_STATE_QUEUED
    await asyncio.sleep(2.5)  # the watchers wait: their jobs do not change
    assert reads, "no read in 2.5 s"
    assert all(n == 5 for n in reads), reads  # one read a round, for all five jobs
    assert len(reads) <= 4, reads  # about one a second, not one per watcher a second

    started = time.monotonic()
    await _note_elsewhere(plane, job_ids[2], "noted by another replica")
    event = await asyncio.wait_for(streams[2].read(), 10)
    assert isinstance(event, types_pb2.JobEvent)
    assert (event.seq, event.reason) == (2, "noted by another replica")
    assert time.monotonic() - started < 3.0  # the next round's read found it
    for stream in streams:
        stream.cancel()


async def test_a_watcher_reads_the_job_only_at_its_start_and_once_it_ended(
    plane: JobPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between its first read and the event saying the job ended, each wake-up of a watcher
    reads only the events after the last one it sent; the job's row is read again once
    that event came (it says whether more follow), and the stream then ends."""
    calls: list[str] = []
    service = JobService
    after, since = service.events_after, service.events_since

    async def counted_after(self: object, *args: object) -> object:
        calls.append("job and events")
        return await after(self, *args)  # type: ignore[arg-type]

    async def counted_since(self: object, *args: object) -> object:
        calls.append("events")
        return await since(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "events_after", counted_after)
    monkeypatch.setattr(service, "events_since", counted_since)
    job_id = await _submit(plane)
    consumer = plane.auth(plane.consumer_key)
    stream = plane.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), metadata=consumer)
    first = await stream.read()
    assert isinstance(first, types_pb2.JobEvent)
    await _note_elsewhere(plane, job_id, "noted by another replica")
    noted = await asyncio.wait_for(stream.read(), 10)
    assert isinstance(noted, types_pb2.JobEvent)
    await plane.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), metadata=consumer)
    seen = [first, noted]
    eof = grpc.aio.EOF  # type: ignore[attr-defined]
    while (event := await asyncio.wait_for(stream.read(), 10)) is not eof:
        assert isinstance(event, types_pb2.JobEvent)
        seen.append(event)
    assert [(e.seq, e.state) for e in seen] == [
        (1, types_pb2.JOB_STATE_QUEUED),
        (2, types_pb2.JOB_STATE_QUEUED),
        (3, types_pb2.JOB_STATE_CANCELLED),
    ]
    assert calls[0] == calls[-1] == "job and events"
    assert calls.count("job and events") == 2, calls
    assert calls.count("events") >= 2, calls  # the noted event's wake-up and the cancel's
