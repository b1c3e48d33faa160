"""Monthly spending limits through the API, with the daemon played by the test: a submit past
the limit is refused with a clean status and stores nothing, the dry run says so, each
threshold is recorded once, and when the month reaches the limit a running job is stopped
through the cancel path (typed reason, outputs kept) and a queued one cancelled; the metrics
show the ratio, the alerts and the stops."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import grpc
import pytest
from gpuplane.v1 import jobs_pb2, ledger_pb2, messaging_pb2, types_pb2

from controlplane.ledger.service import charge_for
from devstack.factories import new_tenant
from storage.layout import attempt_prefix
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
PRICE = 2 * CREDIT
pytestmark = pytest.mark.databases("sqlite", "postgresql")


async def _set_limit(
    plane: JobPlane, credits: float, percents: tuple[int, ...] = (), key: str | None = None
) -> ledger_pb2.Budget:
    reply = await plane.ledger.SetSpendingLimit(
        ledger_pb2.SetSpendingLimitRequest(
            monthly_limit_micro_credits=int(credits * CREDIT), alert_percents=percents
        ),
        metadata=plane.auth(key or plane.consumer_key),
    )
    return reply.budget


async def _budget(plane: JobPlane) -> ledger_pb2.Budget:
    reply = await plane.ledger.GetBudget(
        ledger_pb2.GetBudgetRequest(), metadata=plane.auth(plane.consumer_key)
    )
    return reply.budget


async def _next_cancel(host: ScriptedHost, timeout: float) -> Any:
    async def wait() -> Any:
        while True:
            message = await host.commands.get()
            if message.WhichOneof("msg") == "cancel":
                return message

    return await asyncio.wait_for(wait(), timeout)


async def test_a_submit_past_the_limit_is_refused_and_stores_nothing(plane: JobPlane) -> None:
    budget = await _set_limit(plane, 10)
    assert budget.monthly_limit_micro_credits == 10 * CREDIT
    assert list(budget.alert_percents) == [50, 80, 100]
    assert budget.remaining_micro_credits == 10 * CREDIT
    first = await plane.submit(gpu_count=1, budget_micro_credits=6 * CREDIT)
    before = await plane.balance(plane.consumer_tenant)

    spec = S.JobSpec(
        image="busybox", gpu_count=1, max_duration_seconds=60, budget_micro_credits=5 * CREDIT
    )
    quote = (
        await plane.jobs.SubmitJob(
            jobs_pb2.SubmitJobRequest(spec=spec, dry_run=True),
            metadata=plane.auth(plane.consumer_key),
        )
    ).quote
    assert quote.spending_limit_micro_credits == 10 * CREDIT
    assert quote.spending_limit_remaining_micro_credits == 4 * CREDIT
    assert quote.spending_limit_shortfall.startswith("spending limit: the job needs a hold of")
    assert quote.credit_shortfall == ""  # the credit is there; the limit is what refuses

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await plane.submit(gpu_count=1, budget_micro_credits=5 * CREDIT)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = refused.value.details() or ""
    assert "spending limit" in message
    assert "4.000000 of its 10.000000-credit limit left" in message
    assert "6.000000 held by other jobs" in message
    assert await plane.balance(plane.consumer_tenant) == before
    listed = await plane.jobs.ListJobs(
        jobs_pb2.ListJobsRequest(), metadata=plane.auth(plane.consumer_key)
    )
    assert [j.job_id for j in listed.jobs] == [first.job_id]

    # What fits is still taken; removing the limit lifts it.
    await plane.submit(gpu_count=1, budget_micro_credits=4 * CREDIT)
    with pytest.raises(grpc.aio.AioRpcError):
        await plane.submit(gpu_count=1, budget_micro_credits=1)
    cleared = await _set_limit(plane, 0)
    assert cleared.monthly_limit_micro_credits == 0
    await plane.submit(gpu_count=1, budget_micro_credits=5 * CREDIT)
    await plane.assert_ledger_consistent()


async def test_who_may_set_a_limit_and_bad_values(plane: JobPlane) -> None:
    other, other_key = await new_tenant(plane, "other", S.ROLE_CONSUMER)
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await plane.ledger.SetSpendingLimit(
            ledger_pb2.SetSpendingLimitRequest(tenant_id=other, monthly_limit_micro_credits=1),
            metadata=plane.auth(plane.consumer_key),
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # An admin sets another tenant's; the tenant reads it.
    await plane.ledger.SetSpendingLimit(
        ledger_pb2.SetSpendingLimitRequest(tenant_id=other, monthly_limit_micro_credits=CREDIT),
        metadata=plane.auth(),
    )
    seen = await plane.ledger.GetBudget(
        ledger_pb2.GetBudgetRequest(), metadata=plane.auth(other_key)
    )
    assert seen.budget.monthly_limit_micro_credits == CREDIT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await plane.ledger.GetBudget(
            ledger_pb2.GetBudgetRequest(tenant_id="tenant_nobody"), metadata=plane.auth()
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    bad: list[tuple[ledger_pb2.SetSpendingLimitRequest, str]] = [
        (ledger_pb2.SetSpendingLimitRequest(monthly_limit_micro_credits=-1), "monthly_limit"),
        (ledger_pb2.SetSpendingLimitRequest(monthly_limit_micro_credits=2**63 - 1), "monthly"),
        (
            ledger_pb2.SetSpendingLimitRequest(monthly_limit_micro_credits=1, alert_percents=[0]),
            "alert_percents",
        ),
        (
            ledger_pb2.SetSpendingLimitRequest(
                monthly_limit_micro_credits=1, alert_percents=list(range(1, 12))
            ),
            "alert_percents",
        ),
    ]
    for request, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await plane.ledger.SetSpendingLimit(request, metadata=plane.auth(plane.consumer_key))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (invalid.value.details() or "")
    assert (await _budget(plane)).monthly_limit_micro_credits == 0  # nothing was stored


@pytest.mark.plane(spending_limit_interval_ms=300)
async def test_thresholds_are_recorded_once_and_a_running_job_stops_at_the_limit(
    plane: JobPlane,
) -> None:
    await _set_limit(plane, 10, (50, 80, 100))
    tenant = plane.consumer_tenant
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        # Four hours at 2 credits per GPU-hour would be 8 credits: the budget holds that.
        job = await plane.submit(
            gpu_count=1, max_duration_seconds=4 * 3600, budget_micro_credits=8 * CREDIT
        )
        d = await host.next_dispatch()
        await host.report(d, K.JOB_REPORT_KIND_RUNNING)
        await host.report(d, K.JOB_REPORT_KIND_USAGE, run_time_ms=9_000_000)  # 2.5 h: 5 credits
        await _charged(plane, job.job_id, 5 * CREDIT)
        # The background check (every 0.3 s here) records 50% once, and stops nothing.
        await _alerts_become(plane, [50])
        jobs = plane.plane.jobs
        assert jobs is not None
        again = [s for s in await jobs.enforce_spending_limits() if s.tenant_id == tenant]
        assert [(s.alerts, s.stopped) for s in again] == [([], [])]
        assert again[0].usage == 5 * CREDIT
        budget = await _budget(plane)
        assert budget.spent_micro_credits == 5 * CREDIT
        assert budget.committed_micro_credits == 3 * CREDIT
        assert budget.remaining_micro_credits == 2 * CREDIT

        # A second job that no host can take (2 GPUs) waits queued, its hold within the limit.
        queued = await plane.submit(gpu_count=2, budget_micro_credits=CREDIT)

        # The limit lowered below the month's spend: the background check stops the job
        # through the cancel path, with the typed reason, and records the thresholds passed.
        lowered = await _set_limit(plane, 4, (50, 80, 100))
        assert lowered.remaining_micro_credits == 0
        # ... and cancels the queued one, whose hold is released.
        cancelled = await plane.wait_for(queued.job_id, [S.JOB_STATE_CANCELLED], timeout=5)
        assert cancelled.state_reason.startswith("spending limit: this month's spend reached")
        assert cancelled.charged_micro_credits == 0
        command = await _next_cancel(host, timeout=5)
        assert command.cancel.stop_reason == K.STOP_REASON_SPENDING_LIMIT
        assert command.cancel.job_id == job.job_id
        assert "monthly limit of 4.000000 credits" in command.cancel.reason
        running = await plane.get(job.job_id)
        assert running.state == S.JOB_STATE_RUNNING
        assert running.state_reason == command.cancel.reason
        output = S.ResultObject(
            key=f"{attempt_prefix(job.job_id, 1)}output/partial.txt",
            path="output/partial.txt",
            size_bytes=3,
            sha256="0" * 64,
        )
        # A daemon that stores what the job wrote before it stops reports it FINISHED.
        await host.report(
            d,
            K.JOB_REPORT_KIND_FINISHED,
            stop_reason=K.STOP_REASON_SPENDING_LIMIT,
            run_time_ms=9_360_000,  # 2.6 h: 5.2 credits
            reason=command.cancel.reason,
            manifest=[output],
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_CANCELLED])
    finally:
        await host.close()
    assert done.state_reason == command.cancel.reason
    assert done.charged_micro_credits == charge_for(PRICE, 1, 9_360_000)
    results = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    assert [o.path for o in results.objects] == ["output/partial.txt"]  # kept, as for a cancel
    budget = await _budget(plane)
    assert budget.spent_micro_credits == done.charged_micro_credits
    assert budget.committed_micro_credits == 0
    assert [a.percent for a in budget.alerts] == [50, 80, 100]
    await plane.assert_ledger_consistent()
    metrics = await asyncio.to_thread(_scrape, plane.plane.metrics_port)
    ratio = f'gpuplane_tenant_spend_ratio{{tenant="{plane.consumer_tenant}"}}'
    assert ratio in metrics
    assert "gpuplane_spending_limit_stops_total 2.0" in metrics  # the running and the queued
    for percent in (50, 80, 100):
        assert f'gpuplane_spending_alerts_total{{percent="{percent}"}} 1.0' in metrics


async def _charged(plane: JobPlane, job_id: str, amount: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (await plane.get(job_id)).charged_micro_credits < amount:
        assert time.monotonic() < deadline, "the usage report was not charged"
        await asyncio.sleep(0.05)


async def _alerts_become(plane: JobPlane, percents: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while [a.percent for a in (await _budget(plane)).alerts] != percents:
        assert time.monotonic() < deadline, f"alerts are not {percents}"
        await asyncio.sleep(0.05)


def _scrape(port: int) -> str:
    deadline = time.monotonic() + 15
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = str(reply.read().decode())
        if "gpuplane_tenant_spend_ratio{" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.2)
