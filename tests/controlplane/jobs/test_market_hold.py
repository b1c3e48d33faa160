"""Holds priced on the market: a job's hold is max duration × GPUs × the dearest offer that
matches it at submit (within its max price), the policy ceiling only when none does; no
attempt is placed on a host dearer than its hold assumed; a dry run quotes the same hold with
the caller's balance and says when that is short."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, types_pb2

from devstack.factories import CREDIT
from tests.controlplane.scripted_host import scripted_host
from tests.harness import JobPlane

S = types_pb2
pytestmark = [pytest.mark.timeout(120), pytest.mark.databases("sqlite", "postgresql")]
H100 = "NVIDIA H100 80GB HBM3"
HOUR = 3600
CEILING = 100 * CREDIT  # the settings' default max_price_per_gpu_hour
SUBMITTED = "waiting for the scheduler"


def spec_of(**fields: Any) -> S.JobSpec:
    """A spec with no max price unless given (the factories' default names one)."""
    fields.setdefault("image", "gpuplane-test/busybox:1")
    fields.setdefault("max_duration_seconds", HOUR)
    return S.JobSpec(**fields)


async def submit(plane: JobPlane, **fields: Any) -> S.Job:
    reply = await plane.jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(spec=spec_of(**fields)), metadata=plane.auth(plane.consumer_key)
    )
    return reply.job


async def quote(plane: JobPlane, **fields: Any) -> jobs_pb2.Quote:
    reply = await plane.jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(spec=spec_of(**fields), dry_run=True),
        metadata=plane.auth(plane.consumer_key),
    )
    assert not reply.HasField("job")
    return reply.quote


async def cancel(plane: JobPlane, *jobs: S.Job) -> None:
    for job in jobs:
        await plane.jobs.CancelJob(
            jobs_pb2.CancelJobRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
        )


async def explained(plane: JobPlane, job_id: str) -> S.Job:
    """The job once a scheduling cycle has passed over it."""
    deadline = time.monotonic() + 10
    while (job := await plane.get(job_id)).state_reason == SUBMITTED:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
    return job


async def test_hold_is_the_dearest_matching_offer_never_the_ceiling(plane: JobPlane) -> None:
    cheap = await scripted_host(plane, gpus=4, price=1 * CREDIT)
    dear = await scripted_host(plane, gpus=8, price=3 * CREDIT, model=H100)
    jobs: list[S.Job] = []
    try:
        # Both hosts match: the hold assumes the dearer one, and the stored spec caps at it.
        any_gpu = await submit(plane, gpu_count=2)
        assert any_gpu.hold_micro_credits == 2 * 3 * CREDIT
        assert any_gpu.spec.max_price_per_gpu_hour_micro_credits == 3 * CREDIT
        # Only the cheap host has A100s.
        a100 = await submit(plane, gpu_count=1, gpu_models=["a100"], max_duration_seconds=1800)
        assert a100.hold_micro_credits == CREDIT // 2
        assert a100.spec.max_price_per_gpu_hour_micro_credits == CREDIT
        # A max price excludes the dear host: the dearest match within it is the cheap one.
        capped = await submit(plane, gpu_count=1, max_price_per_gpu_hour_micro_credits=2 * CREDIT)
        assert capped.hold_micro_credits == CREDIT
        assert capped.spec.max_price_per_gpu_hour_micro_credits == CREDIT
        # Busy GPUs still match (the job queues for them): 8 of the dear host's GPUs.
        eight = await submit(plane, gpu_count=8, max_duration_seconds=600)
        assert eight.hold_micro_credits == 8 * 3 * CREDIT // 6
        # Nothing matches: the job's own max price, else the policy's ceiling.
        none_own = await submit(
            plane,
            gpu_count=16,
            max_duration_seconds=60,
            max_price_per_gpu_hour_micro_credits=CREDIT,
        )
        assert none_own.hold_micro_credits == -(-16 * CREDIT // 60)  # charges round up
        none_ceiling = await submit(
            plane, gpu_count=1, gpu_models=["v100"], max_duration_seconds=60
        )
        assert none_ceiling.hold_micro_credits == -(-CEILING // 60)
        assert none_ceiling.spec.max_price_per_gpu_hour_micro_credits == CEILING
        # A budget is the hold, uncapped.
        budget = await submit(plane, gpu_count=1, budget_micro_credits=5 * CREDIT)
        assert budget.hold_micro_credits == 5 * CREDIT
        assert budget.spec.max_price_per_gpu_hour_micro_credits == 0
        jobs = [any_gpu, a100, capped, eight, none_own, none_ceiling, budget]
        balance = await plane.balance(plane.consumer_tenant)
        assert balance.held_micro_credits == sum(j.hold_micro_credits for j in jobs)
    finally:
        await cancel(plane, *jobs)
        await cheap.close()
        await dear.close()
    await plane.assert_ledger_consistent()


async def test_no_attempt_lands_on_a_host_dearer_than_its_hold(plane: JobPlane) -> None:
    cheap = await scripted_host(plane, gpus=1, price=1 * CREDIT)
    dear = None
    try:
        first = await submit(plane, gpu_count=1)
        await plane.wait_for(first.job_id, [S.JOB_STATE_SCHEDULED])
        # Priced while only the (now busy) cheap host is on the market.
        early = await submit(plane, gpu_count=1)
        assert early.hold_micro_credits == CREDIT
        assert (await explained(plane, early.job_id)).state == S.JOB_STATE_QUEUED
        dear = await scripted_host(plane, gpus=1, price=3 * CREDIT)
        late = await submit(plane, gpu_count=1)
        assert late.hold_micro_credits == 3 * CREDIT
        placed = await plane.wait_for(late.job_id, [S.JOB_STATE_SCHEDULED])
        assert placed.host_id == dear.host_id
        assert placed.price_per_gpu_hour_micro_credits == 3 * CREDIT
        # Cycles passed with the dear host free for `early`, which it never got.
        waiting = await plane.get(early.job_id)
        assert waiting.state == S.JOB_STATE_QUEUED, waiting
        assert "1 would fit but exceeds max_price_per_gpu_hour" in waiting.state_reason
        await cancel(plane, first, early, late)
    finally:
        await cheap.close()
        if dear is not None:
            await dear.close()


async def test_quote_holds_what_submit_holds_and_shows_the_balance(plane: JobPlane) -> None:
    host = await scripted_host(plane, gpus=2, price=2 * CREDIT)
    try:
        quoted = await quote(plane, gpu_count=1)
        assert quoted.hold_micro_credits == 2 * CREDIT
        assert quoted.hold_price_per_gpu_hour_micro_credits == 2 * CREDIT
        assert quoted.available_micro_credits == 100 * CREDIT
        assert quoted.credit_shortfall == ""
        assert quoted.explanation.startswith(f"can start now on {host.host_id}")
        job = await submit(plane, gpu_count=1)
        assert job.hold_micro_credits == quoted.hold_micro_credits

        # 2 GPUs × 2 credits × 48 h = 192 credits, with 98 available: a quote says so plainly
        # and submit refuses it, holding nothing.
        long = {"gpu_count": 2, "max_duration_seconds": 48 * HOUR}
        short = await quote(plane, **long)
        assert short.hold_micro_credits == 192 * CREDIT
        assert short.available_micro_credits == 98 * CREDIT
        assert short.credit_shortfall == (
            "insufficient credit: the hold of 192.000000 credits exceeds the 98.000000 credits "
            "available; deposit more or set a lower spec.budget_micro_credits, "
            "spec.max_duration_seconds or spec.max_price_per_gpu_hour_micro_credits"
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await submit(plane, **long)
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "192.000000 credits" in (refused.value.details() or "")
        balance = await plane.balance(plane.consumer_tenant)
        assert (balance.available_micro_credits, balance.held_micro_credits) == (
            98 * CREDIT,
            2 * CREDIT,
        )
        await cancel(plane, job)
    finally:
        await host.close()
    await plane.assert_ledger_consistent()
