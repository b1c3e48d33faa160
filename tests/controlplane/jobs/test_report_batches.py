"""Terminal reports arriving together share a transaction (group commit), and nothing else
changes: each job settles once at its own cost, each host counts each attempt once, and a
report that fails in a batch fails alone."""

from __future__ import annotations

import asyncio

import pytest
from gpuplane.v1 import messaging_pb2, types_pb2
from sqlalchemy import select

from controlplane.jobs.reports import ForeignReport
from controlplane.jobs.service import JobService
from controlplane.registry.models import Host
from devstack.factories import new_gpus, new_online_host
from tests.harness import JobPlane

K = messaging_pb2
JOBS = 12
PRICE = 3_600_000  # 1 micro-credit per ms
pytestmark = [
    pytest.mark.databases("sqlite", "postgresql"),
    # The hosts here never heartbeat: they must not be lost while their jobs run.
    pytest.mark.plane(heartbeat_timeout_ms=600_000),
    pytest.mark.timeout(120),
]


def _jobs(plane: JobPlane) -> JobService:
    assert plane.plane.jobs is not None
    return plane.plane.jobs


async def _running(
    plane: JobPlane, host_id: str, count: int, location: str = "test-lab"
) -> list[str]:
    """`count` 1-GPU jobs placed on `host_id` (the only host they fit) and reported RUNNING."""
    jobs = []
    for _ in range(count):
        job = await plane.submit(
            gpu_count=1,
            max_price_per_gpu_hour_micro_credits=PRICE,
            max_duration_seconds=60,
            locations=[location],
        )
        await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_SCHEDULED])
        report = K.JobReport(
            job_id=job.job_id, attempt=1, host_id=host_id, seq=1, kind=K.JOB_REPORT_KIND_RUNNING
        )
        assert await _jobs(plane).apply_report(report, host_id)
        jobs.append(job.job_id)
    return jobs


def _finished(job_id: str, host_id: str, run_time_ms: int) -> K.JobReport:
    return K.JobReport(
        job_id=job_id,
        attempt=1,
        host_id=host_id,
        seq=2,
        kind=K.JOB_REPORT_KIND_FINISHED,
        exit_code=0,
        run_time_ms=run_time_ms,
        stop_reason=K.STOP_REASON_COMPLETED,
    )


async def _completed_attempts(plane: JobPlane, host_id: str) -> int:
    assert plane.plane.db is not None
    async with plane.plane.db.read() as session:
        count = await session.scalar(select(Host.completed_attempts).where(Host.id == host_id))
    return int(count or 0)


async def test_concurrent_finished_reports_settle_in_shared_transactions(
    plane: JobPlane,
) -> None:
    token = await plane.token()
    host = await new_online_host(
        plane.channel, token, gpus=new_gpus(JOBS), price_per_gpu_hour_micro_credits=PRICE
    )
    jobs = await _running(plane, host.host_id, JOBS)
    before = await plane.balance(plane.consumer_tenant)
    batcher = _jobs(plane).terminal_reports
    batches = batcher.batches
    # Each job its own run time, so a charge applied to the wrong job would show.
    reports = [_finished(job_id, host.host_id, 1000 + n) for n, job_id in enumerate(jobs)]
    applied = await asyncio.gather(*(_jobs(plane).apply_report(r, host.host_id) for r in reports))
    assert applied == [True] * JOBS
    assert batcher.batches - batches < JOBS, "the reports shared transactions"
    for n, job_id in enumerate(jobs):
        done = await plane.wait_for(job_id, [types_pb2.JOB_STATE_SUCCEEDED])
        assert done.charged_micro_credits == 1000 + n
    # Replayed, they change nothing.
    again = await asyncio.gather(*(_jobs(plane).apply_report(r, host.host_id) for r in reports))
    assert again == [False] * JOBS
    assert await _completed_attempts(plane, host.host_id) == JOBS
    after = await plane.balance(plane.consumer_tenant)
    assert after.held_micro_credits == 0  # every hold resolved, the rest released
    spent = sum(1000 + n for n in range(JOBS))
    assert after.available_micro_credits == (
        before.available_micro_credits + before.held_micro_credits - spent
    )
    await plane.assert_ledger_consistent()


async def test_a_report_that_fails_in_a_batch_fails_alone(plane: JobPlane) -> None:
    token = await plane.token(max_uses=2)
    host = await new_online_host(
        plane.channel, token, gpus=new_gpus(4), price_per_gpu_hour_micro_credits=PRICE
    )
    # Dearer than the jobs' max price: none is placed there.
    other = await new_online_host(plane.channel, token, price_per_gpu_hour_micro_credits=2 * PRICE)
    jobs = await _running(plane, host.host_id, 3)
    # A report about the first job from the other host (its own subject): a forgery.
    forged = _finished(jobs[0], other.host_id, 5000)
    honest = [_finished(job_id, host.host_id, 2000) for job_id in jobs[1:]]
    outcomes = await asyncio.gather(
        _jobs(plane).apply_report(forged, other.host_id),
        *(_jobs(plane).apply_report(r, host.host_id) for r in honest),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], ForeignReport)
    assert outcomes[1:] == [True, True]
    assert (await plane.get(jobs[0])).state == types_pb2.JOB_STATE_RUNNING
    for job_id in jobs[1:]:
        done = await plane.wait_for(job_id, [types_pb2.JOB_STATE_SUCCEEDED])
        assert done.charged_micro_credits == 2000
    assert await _completed_attempts(plane, host.host_id) == 2
    await plane.assert_ledger_consistent()


async def test_a_batch_counts_each_hosts_attempts_once(plane: JobPlane) -> None:
    token = await plane.token(max_uses=2)
    hosts = [
        await new_online_host(
            plane.channel,
            token,
            gpus=new_gpus(4),
            price_per_gpu_hour_micro_credits=PRICE,
            location=f"lab-{n}",
        )
        for n in range(2)
    ]
    placed = [
        (host.host_id, job_id)
        for n, (host, count) in enumerate(zip(hosts, (3, 2), strict=True))
        for job_id in await _running(plane, host.host_id, count, f"lab-{n}")
    ]
    applied = await asyncio.gather(
        *(
            _jobs(plane).apply_report(_finished(job_id, host_id, 500), host_id)
            for host_id, job_id in placed
        )
    )
    assert applied == [True] * 5
    assert [await _completed_attempts(plane, h.host_id) for h in hosts] == [3, 2]
    for _, job_id in placed:
        done = await plane.wait_for(job_id, [types_pb2.JOB_STATE_SUCCEEDED])
        assert done.charged_micro_credits == 500
    await plane.assert_ledger_consistent()


async def test_concurrent_provider_faults_each_count_against_the_host(plane: JobPlane) -> None:
    """Attempts lost to their host's fault in concurrent batches each count once in its
    lost_attempts (the host row is locked, not read and written back unlocked): 40 reports
    at once make two batches of 20 in flight together (a second batch may start beside a
    running one from 16 reports here)."""
    count = 40
    token = await plane.token()
    host = await new_online_host(
        plane.channel, token, gpus=new_gpus(count), price_per_gpu_hour_micro_credits=PRICE
    )
    jobs = await _running(plane, host.host_id, count)
    faults = [
        K.JobReport(
            job_id=job_id,
            attempt=1,
            host_id=host.host_id,
            seq=2,
            kind=K.JOB_REPORT_KIND_STOPPED,
            run_time_ms=100,
            stop_reason=K.STOP_REASON_HOST_ERROR,
            reason="the host's disk failed",
        )
        for job_id in jobs
    ]
    batcher = _jobs(plane).terminal_reports
    least, batcher.min_batch = batcher.min_batch, 16
    try:
        applied = await asyncio.gather(
            *(_jobs(plane).apply_report(r, host.host_id) for r in faults)
        )
    finally:
        batcher.min_batch = least
    assert applied == [True] * count
    assert plane.plane.db is not None
    async with plane.plane.db.read() as session:
        lost = await session.scalar(select(Host.lost_attempts).where(Host.id == host.host_id))
    assert lost == count
    for job_id in jobs:  # each requeued for another host, never charged
        job = await plane.get(job_id)
        assert job.charged_micro_credits == 0
    await plane.assert_ledger_consistent()
