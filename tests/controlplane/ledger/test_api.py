"""The ledger through the job path and the LedgerService RPCs, with the daemon played by the
test: metered charging, the budget stop, provider-fault refunds of metered charges, refunds,
payouts, usage reports and statements, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from gpuplane.v1 import ledger_pb2, messaging_pb2, registry_pb2, types_pb2

from controlplane.ledger.service import charge_for, split_fee
from devstack.factories import new_key, new_tenant
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
PRICE = 2_000_000  # 2 credits per GPU-hour
FEE_BP = 1000  # the default platform fee
pytestmark = pytest.mark.databases("sqlite", "postgresql")


async def next_cancel(host: ScriptedHost, timeout: float = 10.0) -> registry_pb2.CancelCommand:
    """The next CancelCommand sent to the host (other commands are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await host.commands.get()
            if message.WhichOneof("msg") == "cancel":
                return message.cancel


async def no_cancel(host: ScriptedHost) -> None:
    """No CancelCommand is waiting for the host."""
    while not host.commands.empty():
        assert host.commands.get_nowait().WhichOneof("msg") != "cancel"


async def charged_becomes(plane: JobPlane, job_id: str, amount: int) -> types_pb2.Job:
    async with asyncio.timeout(10):
        while True:
            job = await plane.get(job_id)
            if job.charged_micro_credits == amount:
                return job
            await asyncio.sleep(0.05)


async def entries(plane: JobPlane, tenant: str, **kw: Any) -> list[types_pb2.LedgerEntry]:
    reply = await plane.ledger.ListEntries(
        ledger_pb2.ListEntriesRequest(tenant_id=tenant, page_size=500, **kw),
        metadata=plane.auth(),
    )
    return list(reply.entries)


async def test_budget_stops_the_job_near_its_budget_and_charges_at_most_the_hold(
    plane: JobPlane,
) -> None:
    budget = charge_for(PRICE, 1, 30_000)  # 30 s of the host's price
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, budget_micro_credits=budget)
        assert job.hold_micro_credits == budget
        dispatch = await host.next_dispatch()
        await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        for seconds in (10, 20):
            await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=seconds * 1000)
            await charged_becomes(plane, job.job_id, charge_for(PRICE, 1, seconds * 1000))
        await no_cancel(host)
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=30_000)
        cancel = await next_cancel(host)
        assert (cancel.job_id, cancel.attempt, cancel.reason) == (job.job_id, 1, "budget_exhausted")
        assert cancel.stop_reason == K.STOP_REASON_BUDGET_EXHAUSTED
        await charged_becomes(plane, job.job_id, budget)
        # It ran on a little before the daemon stopped it: never charged past the hold.
        await host.report(
            dispatch,
            K.JOB_REPORT_KIND_STOPPED,
            stop_reason=K.STOP_REASON_BUDGET_EXHAUSTED,
            reason="budget_exhausted",
            run_time_ms=31_500,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    assert done.state_reason == "budget_exhausted"
    assert done.charged_micro_credits == budget == done.hold_micro_credits
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 100 * CREDIT - budget
    assert consumer.held_micro_credits == 0
    provider = await plane.balance(plane.provider_tenant)
    assert provider.earnings_micro_credits == split_fee(budget, FEE_BP)[0]
    await plane.assert_ledger_consistent()


async def test_a_usage_tick_past_the_budget_is_capped_and_stops_the_job(
    plane: JobPlane,
) -> None:
    budget = charge_for(PRICE, 2, 30_000)
    host = await scripted_host(plane, price=PRICE, gpus=2)
    try:
        job = await plane.submit(gpu_count=2, budget_micro_credits=budget)
        dispatch = await host.next_dispatch()
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=20_000)
        # The next tick (a 60 s interval) lands far past the budget.
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=80_000)
        assert (await next_cancel(host)).reason == "budget_exhausted"
        await charged_becomes(plane, job.job_id, budget)
        # A daemon that reports the stop as a plain cancel still ends it budget_exhausted.
        await host.report(
            dispatch,
            K.JOB_REPORT_KIND_STOPPED,
            legacy_stop_reason="cancelled",
            reason="budget_exhausted",
            run_time_ms=81_000,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    assert (done.state_reason, done.charged_micro_credits) == ("budget_exhausted", budget)
    await plane.assert_ledger_consistent()


async def test_the_final_report_charges_only_what_metering_did_not(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1)
        dispatch = await host.next_dispatch()
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        for ms in (60_000, 120_000, 120_000):  # the last one a duplicate tick
            await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=ms)
        await charged_becomes(plane, job.job_id, charge_for(PRICE, 1, 120_000))
        await host.report(dispatch, K.JOB_REPORT_KIND_UPLOADING, exit_code=0, run_time_ms=150_001)
        uploading = await plane.wait_for(job.job_id, [S.JOB_STATE_UPLOADING])
        assert uploading.charged_micro_credits == charge_for(PRICE, 1, 120_000)
        await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=150_001)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    finally:
        await host.close()
    total = charge_for(PRICE, 1, 150_001)
    assert done.charged_micro_credits == total
    assert done.attempts[0].charged_micro_credits == total
    rows = await entries(plane, plane.consumer_tenant, job_id=job.job_id)
    charges = [e for e in rows if e.kind in (S.TRANSFER_KIND_CHARGE, S.TRANSFER_KIND_FEE)]
    assert -sum(e.amount_micro_credits for e in charges) == total
    # Metered at 60 s and 120 s (the duplicate tick found nothing to charge); the container
    # had ended by the UPLOADING report, which charges nothing: the FINISHED report charged
    # the last 30.001 s.
    assert len(charges) == 2 * 3
    assert (await plane.balance(plane.provider_tenant)).earnings_micro_credits == split_fee(
        total, FEE_BP
    )[0]
    await plane.assert_ledger_consistent()


async def test_metered_charges_of_a_provider_fault_attempt_are_refunded(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, max_retries=1)
        first = await host.next_dispatch()
        await host.report(first, K.JOB_REPORT_KIND_RUNNING)
        await host.report(first, K.JOB_REPORT_KIND_USAGE, run_time_ms=60_000)
        await charged_becomes(plane, job.job_id, charge_for(PRICE, 1, 60_000))
        assert (await plane.balance(plane.provider_tenant)).earnings_micro_credits > 0
        await host.report(
            first,
            K.JOB_REPORT_KIND_STOPPED,
            legacy_stop_reason="host_error",
            reason="host error: docker died",
            run_time_ms=61_000,
            legacy_provider_fault=True,
        )
        second = await host.next_dispatch()
        assert second.attempt == 2
        requeued = await plane.get(job.job_id)
        assert requeued.charged_micro_credits == 0
        assert (await plane.balance(plane.provider_tenant)).earnings_micro_credits == 0
        await host.report(second, K.JOB_REPORT_KIND_RUNNING)
        await host.report(second, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=10_000)
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])
    finally:
        await host.close()
    cost = charge_for(PRICE, 1, 10_000)
    assert done.attempts[0].charged_micro_credits == 0
    assert (done.attempts[1].charged_micro_credits, done.charged_micro_credits) == (cost, cost)
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 100 * CREDIT - cost
    rows = await entries(plane, plane.consumer_tenant, job_id=job.job_id)
    refunds = [e for e in rows if e.kind == S.TRANSFER_KIND_REFUND]
    assert sum(e.amount_micro_credits for e in refunds) == charge_for(PRICE, 1, 60_000)
    assert {e.attempt for e in refunds} == {1}
    provider = await plane.balance(plane.provider_tenant)
    assert provider.earnings_micro_credits == split_fee(cost, FEE_BP)[0]
    await plane.assert_ledger_consistent()


async def test_metered_charges_of_a_lost_host_are_refunded(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job = await plane.submit(gpu_count=1, max_retries=0)
        dispatch = await host.next_dispatch()
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await host.report(dispatch, K.JOB_REPORT_KIND_USAGE, run_time_ms=90_000)
        await charged_becomes(plane, job.job_id, charge_for(PRICE, 1, 90_000))
        await host.stop_heartbeats()
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED], timeout=30)
    finally:
        await host.close()
    assert "no retries left" in done.state_reason
    assert done.charged_micro_credits == 0
    consumer = await plane.balance(plane.consumer_tenant)
    assert (consumer.available_micro_credits, consumer.held_micro_credits) == (100 * CREDIT, 0)
    assert (await plane.balance(plane.provider_tenant)).earnings_micro_credits == 0
    await plane.assert_ledger_consistent()


async def run_job(
    plane: JobPlane, host: ScriptedHost, run_time_ms: int, **spec: Any
) -> types_pb2.Job:
    job = await plane.submit(gpu_count=1, **spec)
    dispatch = await host.next_dispatch()
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await host.report(dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=run_time_ms)
    return await plane.wait_for(job.job_id, [S.JOB_STATE_SUCCEEDED])


async def test_refund_job_payout_and_their_replays(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        # One GPU-hour: 2 credits.
        done = await run_job(plane, host, 3_600_000, max_duration_seconds=7200)
    finally:
        await host.close()
    assert done.charged_micro_credits == 2 * CREDIT
    provider_key = await new_key(plane, plane.provider_tenant, types_pb2.ROLE_PROVIDER)
    admin = plane.auth()
    refund = ledger_pb2.RefundJobRequest(
        job_id=done.job_id, amount_micro_credits=CREDIT // 2, reason="slow", idempotency_key="r1"
    )
    first = await plane.ledger.RefundJob(refund, metadata=admin)
    again = await plane.ledger.RefundJob(refund, metadata=admin)
    assert (again.transfer_id, again.refunded_micro_credits) == (first.transfer_id, CREDIT // 2)
    assert first.balance.available_micro_credits == 98 * CREDIT + CREDIT // 2
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await plane.ledger.RefundJob(
            ledger_pb2.RefundJobRequest(
                job_id=done.job_id,
                amount_micro_credits=2 * CREDIT,
                reason="x",
                idempotency_key="r2",
            ),  # fmt: skip
            metadata=admin,
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await plane.ledger.RefundJob(refund, metadata=plane.auth(plane.consumer_key))
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED

    earned = split_fee(2 * CREDIT, FEE_BP)[0] - split_fee(CREDIT // 2, FEE_BP)[0]
    assert (await plane.balance(plane.provider_tenant)).earnings_micro_credits == earned
    payout = ledger_pb2.PayoutRequest(
        amount_micro_credits=CREDIT, destination="iban:DE00", idempotency_key="p1"
    )
    paid = await plane.ledger.Payout(payout, metadata=plane.auth(provider_key))
    replay = await plane.ledger.Payout(payout, metadata=plane.auth(provider_key))
    assert (replay.payout_id, replay.transfer_id) == (paid.payout_id, paid.transfer_id)
    assert paid.state == ledger_pb2.PAYOUT_STATE_PENDING
    assert replay.balance.earnings_micro_credits == earned - CREDIT
    for request, code in [
        (ledger_pb2.PayoutRequest(amount_micro_credits=10, destination="x", idempotency_key="s"),
         grpc.StatusCode.INVALID_ARGUMENT),  # below the minimum payout
        (ledger_pb2.PayoutRequest(amount_micro_credits=CREDIT, idempotency_key="d"),
         grpc.StatusCode.INVALID_ARGUMENT),  # no destination
        (ledger_pb2.PayoutRequest(amount_micro_credits=CREDIT, destination="x"),
         grpc.StatusCode.INVALID_ARGUMENT),  # no idempotency key
        (ledger_pb2.PayoutRequest(amount_micro_credits=5 * CREDIT, destination="x",
                                  idempotency_key="big"),
         grpc.StatusCode.FAILED_PRECONDITION),  # more than earned
        (ledger_pb2.PayoutRequest(tenant_id=plane.consumer_tenant, amount_micro_credits=CREDIT,
                                  destination="x", idempotency_key="other"),
         grpc.StatusCode.PERMISSION_DENIED),  # someone else's earnings
    ]:  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await plane.ledger.Payout(request, metadata=plane.auth(provider_key))
        assert error.value.code() == code, request
    # A failed payout is reversed: the money back in earnings.
    reversed_ = await plane.ledger.FailPayout(
        ledger_pb2.FailPayoutRequest(payout_id=paid.payout_id, reason="bank rejected it"),
        metadata=admin,
    )
    assert reversed_.payout.state == ledger_pb2.PAYOUT_STATE_REVERSED
    assert reversed_.balance.earnings_micro_credits == earned
    provider = await plane.balance(plane.provider_tenant)
    assert provider.earnings_micro_credits == earned
    rows = await entries(plane, plane.provider_tenant)
    assert [types_pb2.TransferKind.Name(e.kind) for e in rows[:2]] == [
        "TRANSFER_KIND_PAYOUT_REVERSAL",
        "TRANSFER_KIND_PAYOUT",
    ]
    await plane.assert_ledger_consistent()


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def test_usage_per_job_and_per_period_paged(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        jobs = [await run_job(plane, host, ms) for ms in (60_000, 120_000, 180_000)]
    finally:
        await host.close()
    consumer = plane.auth(plane.consumer_key)
    first = await plane.ledger.GetUsage(ledger_pb2.GetUsageRequest(page_size=2), metadata=consumer)
    assert [r.job_id for r in first.rows] == [jobs[2].job_id, jobs[1].job_id]
    assert first.next_page_token
    assert first.total_gpu_time_ms == 360_000
    total = sum(j.charged_micro_credits for j in jobs)
    assert first.total_cost_micro_credits == total
    row = first.rows[0]
    assert (row.gpu_time_ms, row.cost_micro_credits, row.job_count) == (
        180_000,
        charge_for(PRICE, 1, 180_000),
        1,
    )
    assert row.host_id == host.host_id
    assert row.gpu_model == "NVIDIA A100-SXM4-80GB"
    rest = await plane.ledger.GetUsage(
        ledger_pb2.GetUsageRequest(page_size=2, page_token=first.next_page_token),
        metadata=consumer,
    )
    assert [r.job_id for r in rest.rows] == [jobs[0].job_id]
    assert rest.next_page_token == ""
    for grouping in (ledger_pb2.USAGE_GROUPING_DAY, ledger_pb2.USAGE_GROUPING_MONTH):
        periods = await plane.ledger.GetUsage(
            ledger_pb2.GetUsageRequest(group_by=grouping), metadata=consumer
        )
        assert len(periods.rows) == 1  # all three ran today
        (period,) = periods.rows
        assert (period.job_count, period.gpu_time_ms, period.cost_micro_credits) == (
            3,
            360_000,
            total,
        )
        start = period.period_start.ToDatetime(tzinfo=UTC)
        now = datetime.now(UTC)
        assert start <= now
        assert start.day == (now.day if grouping == ledger_pb2.USAGE_GROUPING_DAY else 1)
    one = await plane.ledger.GetUsage(
        ledger_pb2.GetUsageRequest(job_id=jobs[1].job_id), metadata=consumer
    )
    assert [r.job_id for r in one.rows] == [jobs[1].job_id]
    later = await plane.ledger.GetUsage(
        ledger_pb2.GetUsageRequest(start_time=ts(datetime.now(UTC) + timedelta(hours=1))),
        metadata=consumer,
    )
    assert (list(later.rows), later.total_cost_micro_credits) == ([], 0)
    # The provider sees the jobs its hosts ran; another consumer sees none of them.
    provider_key = await new_key(plane, plane.provider_tenant, types_pb2.ROLE_PROVIDER)
    provided = await plane.ledger.GetUsage(
        ledger_pb2.GetUsageRequest(), metadata=plane.auth(provider_key)
    )
    assert {r.job_id for r in provided.rows} == {j.job_id for j in jobs}
    _, stranger = await new_tenant(plane, "stranger", types_pb2.ROLE_CONSUMER)
    none = await plane.ledger.GetUsage(ledger_pb2.GetUsageRequest(), metadata=plane.auth(stranger))
    assert list(none.rows) == []


async def test_statement_filters_by_kind_job_and_time_and_pages(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        jobs = [await run_job(plane, host, 60_000) for _ in range(2)]
    finally:
        await host.close()
    tenant = plane.consumer_tenant
    everything = await entries(plane, tenant)
    # deposit, then per job: hold and release (each a line on available and one on held),
    # charge, fee (newest first)
    assert len(everything) == 1 + 6 * 2
    holds = await entries(plane, tenant, kinds=[S.TRANSFER_KIND_HOLD])
    assert {e.job_id for e in holds} == {j.job_id for j in jobs}
    of_job = await entries(plane, tenant, job_id=jobs[0].job_id)
    assert {e.job_id for e in of_job} == {jobs[0].job_id}
    assert len(of_job) == 6
    future = await entries(plane, tenant, start_time=ts(datetime.now(UTC) + timedelta(hours=1)))
    assert future == []
    past = await entries(plane, tenant, end_time=ts(datetime.now(UTC) - timedelta(hours=1)))
    assert past == []
    seen: list[str] = []
    token = ""
    while True:
        reply = await plane.ledger.ListEntries(
            ledger_pb2.ListEntriesRequest(tenant_id=tenant, page_size=2, page_token=token),
            metadata=plane.auth(),
        )
        seen += [e.transfer_id for e in reply.entries]
        token = reply.next_page_token
        if not token:
            break
    assert seen == [e.transfer_id for e in everything]
