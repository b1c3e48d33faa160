"""A submit's rows, written without the ORM (one statement on PostgreSQL): the stored job is the
job the reply showed, its first event is QUEUED, and an idempotent replay still answers the
first job."""

from __future__ import annotations

import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from tests.harness import JobPlane

pytestmark = [pytest.mark.timeout(120), pytest.mark.databases("sqlite", "postgresql")]

SPEC = types_pb2.JobSpec(
    image="gpuplane-test/busybox:1",
    command=["true"],
    gpu_count=1,
    max_duration_seconds=60,
    max_price_per_gpu_hour_micro_credits=1_000_000,
    labels={"team": "a", "run": "7"},
)


async def test_the_stored_job_is_the_one_the_reply_showed(plane: JobPlane) -> None:
    consumer = plane.auth(plane.consumer_key)
    request = jobs_pb2.SubmitJobRequest(spec=SPEC, idempotency_key="rows-1")
    submitted = (await plane.jobs.SubmitJob(request, metadata=consumer)).job
    stored = (
        await plane.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=submitted.job_id), metadata=consumer)
    ).job
    assert stored == submitted
    assert stored.state == types_pb2.JOB_STATE_QUEUED
    assert dict(stored.spec.labels) == {"team": "a", "run": "7"}
    assert stored.idempotency_key == "rows-1"
    assert stored.hold_micro_credits > 0
    events = plane.jobs.WatchJob(
        jobs_pb2.WatchJobRequest(job_id=submitted.job_id), metadata=consumer
    )
    first = await events.read()  # the stream follows a queued job: its first event is enough
    events.cancel()
    assert isinstance(first, types_pb2.JobEvent)
    assert (first.seq, first.attempt, first.state) == (1, 1, types_pb2.JOB_STATE_QUEUED)

    replay = (await plane.jobs.SubmitJob(request, metadata=consumer)).job
    assert replay.job_id == submitted.job_id
