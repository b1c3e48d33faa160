"""Small truths of the job path, with the daemon played by the test: a cancel keeps the
caller's reason, a job past max_duration is charged exactly max_duration, a lost attempt
shows as LOST."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, types_pb2

from controlplane.ledger.service import charge_for
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import JobPlane

K = messaging_pb2
S = types_pb2
PRICE = 2_000_000
pytestmark = pytest.mark.databases("sqlite", "postgresql")


async def _next_cancel(host: ScriptedHost) -> Any:
    while True:
        message = await host.commands.get()
        if message.WhichOneof("msg") == "cancel":
            return message


async def _cancel(plane: JobPlane, job_id: str, reason: str) -> S.Job:
    reply = await plane.jobs.CancelJob(
        jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason),
        metadata=plane.auth(plane.consumer_key),
    )
    return reply.job


async def test_a_cancel_keeps_the_callers_reason(plane: JobPlane) -> None:
    queued = await plane.submit(gpu_count=1)  # no host yet
    job = await _cancel(plane, queued.job_id, "wrong dataset")
    assert job.state == S.JOB_STATE_CANCELLED
    assert job.state_reason == "cancelled: wrong dataset"

    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        running = await plane.submit(gpu_count=1)
        d = await host.next_dispatch()
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(running.job_id, [S.JOB_STATE_RUNNING])
        job = await _cancel(plane, running.job_id, "changed my mind")
        # Still running until the daemon stops it; the reason is the caller's from now on.
        assert job.state == S.JOB_STATE_RUNNING
        assert job.state_reason == "cancelled: changed my mind"
        command = await asyncio.wait_for(_next_cancel(host), timeout=5)
        assert command.cancel.reason == "cancelled: changed my mind"
        await host.report(
            d, K.JOB_REPORT_KIND_STOPPED, stop_reason=K.STOP_REASON_CANCELLED, run_time_ms=2000
        )
        done = await plane.wait_for(running.job_id, [S.JOB_STATE_CANCELLED])
        assert done.state_reason == "cancelled: changed my mind"
        events = [a.reason for a in done.attempts]
        assert events == ["cancelled: changed my mind"]
    finally:
        await host.close()
    await plane.assert_ledger_consistent()


async def test_past_max_duration_is_charged_exactly_max_duration(plane: JobPlane) -> None:
    """The daemon stops a job some time after its limit (kill latency, a late report): what
    lies beyond max_duration is never charged, in metering nor at settlement."""
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        # A budget above max_duration's cost: the hold alone would not cap the charge.
        budget = charge_for(PRICE, 1, 60_000)
        job = await plane.submit(gpu_count=1, max_duration_seconds=10, budget_micro_credits=budget)
        d = await host.next_dispatch()
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await host.report(d, K.JOB_REPORT_KIND_USAGE, run_time_ms=9_000)
        await host.report(d, K.JOB_REPORT_KIND_USAGE, run_time_ms=12_500)  # metered past it
        await host.report(
            d,
            K.JOB_REPORT_KIND_FINISHED,
            exit_code=137,
            run_time_ms=14_000,
            stop_reason=K.STOP_REASON_TIMED_OUT,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_TIMED_OUT])
    finally:
        await host.close()
    exact = charge_for(PRICE, 1, 10_000)
    assert exact < charge_for(PRICE, 1, 14_000)
    assert done.charged_micro_credits == exact
    assert done.attempts[0].charged_micro_credits == exact
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.held_micro_credits == 0
    assert consumer.available_micro_credits == 100 * 1_000_000 - exact
    await plane.assert_ledger_consistent()


async def test_control_characters_in_a_daemon_report_are_replaced_not_stored(
    plane: JobPlane,
) -> None:
    """A report cannot be refused (it is how the attempt ended): its NUL and other control
    characters are replaced, so that PostgreSQL stores it and terminals show it safely."""
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1)
        d = await host.next_dispatch()
        await host.report(
            d,
            K.JOB_REPORT_KIND_FAILED_TO_START,
            reason="image\x00 pull\x1b[31m failed\nretry later",
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    assert done.state_reason == "image\ufffd pull\ufffd[31m failed\nretry later"
    await plane.assert_ledger_consistent()
