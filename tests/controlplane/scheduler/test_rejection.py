"""Unsatisfiable jobs: a queued job no registered host could ever run is REJECTED after the
grace, its hold released; a lost host still counts, a host registered within the grace saves
the job; and a retry goes to another host than the one that lost it."""

from __future__ import annotations

import pytest
from gpuplane.v1 import messaging_pb2, types_pb2

from tests.controlplane.registry.test_telemetry import eventually, get_host
from tests.controlplane.scripted_host import scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
QUICK = pytest.mark.plane(reject_unsatisfiable_after_seconds=0.3)
pytestmark = [pytest.mark.databases("sqlite", "postgresql"), pytest.mark.timeout(60)]


@QUICK
async def test_a_job_no_host_could_ever_run_is_rejected_and_its_hold_released(
    plane: JobPlane,
) -> None:
    host = await scripted_host(plane, gpus=2)  # NVIDIA A100-SXM4-80GB
    try:
        job = await plane.submit(gpu_count=1, gpu_models=["B300"])
        assert (await plane.balance(plane.consumer_tenant)).held_micro_credits > 0
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_REJECTED])
        too_many = await plane.submit(gpu_count=3)
        assert (await plane.wait_for(too_many.job_id, [S.JOB_STATE_REJECTED])).state_reason == (
            "no registered host could ever run 3×GPU: 1 has too few matching GPUs"
        )
    finally:
        await host.close()
    assert done.state_reason == (
        "no registered host could ever run 1×B300: "
        "1 has no GPU of an allowed model/VRAM/compute capability"
    )
    assert done.charged_micro_credits == 0
    assert list(done.attempts) == []
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.held_micro_credits == 0
    assert consumer.available_micro_credits == 100 * CREDIT
    await plane.assert_ledger_consistent()


@QUICK
async def test_a_lost_host_that_could_run_the_job_keeps_it_queued(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=1)
    await host.stop_heartbeats()

    async def is_lost() -> bool:
        return (await get_host(plane, host.host_id)).state == S.HOST_STATE_LOST

    await eventually(is_lost, timeout=8)
    lost = await plane.submit(gpu_count=1)  # only the lost host could run it
    # A job submitted after it that nothing could run: once it is rejected, a cycle past
    # the grace has looked at the older job too.
    witness = await plane.submit(gpu_count=1, gpu_models=["B300"])
    await plane.wait_for(witness.job_id, [S.JOB_STATE_REJECTED])
    waiting = await plane.get(lost.job_id)
    assert waiting.state == S.JOB_STATE_QUEUED
    await host.close()


async def test_a_host_registered_within_the_grace_saves_the_job(plane: JobPlane) -> None:
    job = await plane.submit(gpu_count=1, gpu_models=["B300"])

    async def explained() -> types_pb2.Job | None:
        found = await plane.get(job.job_id)
        return found if found.state_reason != "waiting for the scheduler" else None

    # A cycle has explained why it waits (no host at all), and left it queued.
    waiting = await eventually(explained)
    assert waiting.state == S.JOB_STATE_QUEUED
    assert waiting.state_reason == "no online hosts"
    host = await scripted_host(plane, gpus=1, model="NVIDIA B300")
    try:
        dispatch = await host.next_dispatch()
        assert dispatch.job_id == job.job_id
        placed = await plane.get(job.job_id)
        assert placed.state == S.JOB_STATE_SCHEDULED
    finally:
        await host.close()


async def test_a_retry_stays_when_no_other_host_is_within_its_price(plane: JobPlane) -> None:
    cheap = await scripted_host(plane, gpus=1, price=1_000_000)
    dear = await scripted_host(plane, gpus=1, price=3_000_000)  # over the max price (2)
    try:
        job = await plane.submit(gpu_count=1)
        d1 = await cheap.next_dispatch()
        await cheap.report(
            d1,
            K.JOB_REPORT_KIND_FAILED_TO_START,
            stop_reason=K.STOP_REASON_HOST_ERROR,
            reason="docker died",
        )
        d2 = await cheap.next_dispatch()
        assert (d2.job_id, d2.attempt) == (job.job_id, 2)
    finally:
        await cheap.close()
        await dear.close()


async def test_a_retry_goes_to_another_host(plane: JobPlane) -> None:
    # Same price: the job's max price is the dearest offer at submit (scheduler/market.py),
    # so only a host at that price is within it.
    first = await scripted_host(plane, gpus=1, price=1_000_000)
    other = None
    try:
        job = await plane.submit(gpu_count=1)
        d1 = await first.next_dispatch()
        other = await scripted_host(plane, gpus=1, price=1_000_000)
        await first.report(
            d1,
            K.JOB_REPORT_KIND_FAILED_TO_START,
            stop_reason=K.STOP_REASON_IMAGE_PULL_FAILED,
            reason="registry unreachable",
        )
        # The first host is free again, but lost this job's first attempt.
        d2 = await other.next_dispatch()
        assert (d2.job_id, d2.attempt) == (job.job_id, 2)
        retried = await plane.get(job.job_id)
        assert retried.host_id == other.host_id
    finally:
        await first.close()
        if other is not None:
            await other.close()
