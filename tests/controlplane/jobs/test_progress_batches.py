"""Reports that do not end their attempt, arriving together, share a transaction (group
commit) and each still moves its own job: every job UPLOADING, each job's history one event
longer, and a replay changes nothing."""

from __future__ import annotations

import asyncio

import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, types_pb2

from devstack.factories import new_gpus, new_online_host
from tests.controlplane.jobs.test_report_batches import PRICE, _jobs, _running
from tests.harness import JobPlane

K = messaging_pb2
JOBS = 8
pytestmark = [
    pytest.mark.databases("sqlite", "postgresql"),
    # The host here never heartbeats: it must not be lost while its jobs run.
    pytest.mark.plane(heartbeat_timeout_ms=600_000),
    pytest.mark.timeout(120),
]


async def test_concurrent_progress_reports_share_transactions(plane: JobPlane) -> None:
    token = await plane.token()
    host = await new_online_host(
        plane.channel, token, gpus=new_gpus(JOBS), price_per_gpu_hour_micro_credits=PRICE
    )
    jobs = await _running(plane, host.host_id, JOBS)
    batcher = _jobs(plane).progress_reports
    batches = batcher.batches
    reports = [
        K.JobReport(
            job_id=job_id,
            attempt=1,
            host_id=host.host_id,
            seq=2,
            kind=K.JOB_REPORT_KIND_UPLOADING,
            exit_code=n,  # each job its own, so a report applied to another job would show
        )
        for n, job_id in enumerate(jobs)
    ]
    applied = await asyncio.gather(*(_jobs(plane).apply_report(r, host.host_id) for r in reports))
    assert applied == [True] * JOBS
    assert batcher.batches - batches < JOBS, "the reports shared transactions"
    consumer = plane.auth(plane.consumer_key)
    for n, job_id in enumerate(jobs):
        job = (
            await plane.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=consumer)
        ).job
        assert job.state == types_pb2.JOB_STATE_UPLOADING
        assert job.exit_code == n
    # Replayed, they change nothing.
    again = await asyncio.gather(*(_jobs(plane).apply_report(r, host.host_id) for r in reports))
    assert again == [False] * JOBS
