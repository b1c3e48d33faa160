"""Budgets stop on time: the run time a budget pays for (exact integer arithmetic), the
dispatch that carries it, and the control plane's own stop of an attempt whose daemon ignored
it, charged exactly the budget; with the daemon played by the test, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from gpuplane.v1 import jobs_pb2, messaging_pb2, registry_pb2, types_pb2
from hypothesis import given
from hypothesis import strategies as st

from controlplane.jobs.billing import budget_charge
from controlplane.jobs.budget import MAX_BUDGET_MS, AttemptBudget, attempt_budget, budget_run_ms
from controlplane.ledger.service import charge_for
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
S = types_pb2
PRICE = 2_000_000  # 2 credits per GPU-hour


# The arithmetic ---------------------------------------------------------------------------


def test_the_issue_s_budget_pays_for_nine_seconds() -> None:
    """`--budget 0.005` at 2 credits per GPU-hour on one GPU: 9 s, charged 0.005 exactly."""
    assert budget_run_ms(5_000, PRICE, 1) == 9_000
    assert charge_for(PRICE, 1, 9_000) == 5_000
    assert budget_run_ms(5_000, PRICE, 2) == 4_500
    # Rounded down: 7 micro-credits at 3 credits/GPU-h pay for 8.4 ms, so 8 ms.
    assert budget_run_ms(7, 3 * CREDIT, 1) == 8
    assert charge_for(3 * CREDIT, 1, 8) <= 7 < charge_for(3 * CREDIT, 1, 9)
    # A spent budget stops the attempt at once; a huge one is bounded.
    assert budget_run_ms(0, PRICE, 1) == 1
    assert budget_run_ms(10**15, 1, 1) == MAX_BUDGET_MS


@given(
    amount=st.integers(1, 10**15),
    price=st.integers(1, 10**12),
    gpus=st.integers(1, 64),
)
def test_the_budget_s_run_time_is_the_longest_its_budget_pays_for(
    amount: int, price: int, gpus: int
) -> None:
    ms = budget_run_ms(amount, price, gpus)
    if ms == MAX_BUDGET_MS:
        return
    if charge_for(price, gpus, 1) > amount:  # not even 1 ms: stopped at once
        assert ms == 1
        return
    assert charge_for(price, gpus, ms) <= amount < charge_for(price, gpus, ms + 1)


def test_an_attempt_s_budget_is_what_earlier_attempts_left() -> None:
    spec = S.JobSpec(gpu_count=1, budget_micro_credits=5_000)
    assert attempt_budget(spec, 0, PRICE, 1) == AttemptBudget(5_000, 9_000)
    assert attempt_budget(spec, 2_000, PRICE, 1) == AttemptBudget(3_000, 5_400)
    assert attempt_budget(spec, 9_000, PRICE, 1) == AttemptBudget(0, 1)
    assert attempt_budget(S.JobSpec(gpu_count=1), 0, PRICE, 1) is None


def test_the_charge_is_at_most_the_budget_and_exactly_it_at_its_run_time() -> None:
    # No budget: the cost as computed.
    assert budget_charge(7_000, 12_600, None, None) == 7_000
    # Ran the budget's whole run time: exactly the budget, even when the rounded-down run
    # time costs a micro-credit less.
    assert budget_charge(6, 8, 7, 8) == 7
    assert budget_charge(5_000, 9_000, 5_000, 9_000) == 5_000
    # Stopped earlier (its exit, a cancel): what it ran, never more than the budget.
    assert budget_charge(2_000, 3_600, 5_000, 9_000) == 2_000
    assert budget_charge(9_999, 3_600, 5_000, 9_000) == 5_000


# On a control plane ------------------------------------------------------------------------

pytestmark = [pytest.mark.databases("sqlite", "postgresql"), pytest.mark.timeout(60)]


async def next_cancel(host: ScriptedHost, timeout: float = 15.0) -> registry_pb2.CancelCommand:
    """The next CancelCommand sent to the host (other commands are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await host.commands.get()
            if message.WhichOneof("msg") == "cancel":
                return message.cancel


async def budget_job(
    plane: JobPlane, host: ScriptedHost, run_ms: int, **spec: object
) -> tuple[types_pb2.Job, messaging_pb2.DispatchMessage]:
    job = await plane.submit(gpu_count=1, budget_micro_credits=charge_for(PRICE, 1, run_ms), **spec)
    return job, await host.next_dispatch()


async def test_the_dispatch_carries_the_price_and_the_budget_s_run_time(
    plane: JobPlane,
) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=4)
    try:
        budgeted = await plane.submit(gpu_count=2, budget_micro_credits=5_000)
        dispatch = await host.next_dispatch()
        plain = await plane.submit(gpu_count=2)
        unbudgeted = await host.next_dispatch()
    finally:
        await host.close()
    assert dispatch.job_id == budgeted.job_id
    assert dispatch.price_per_gpu_hour_micro_credits == PRICE
    assert (dispatch.budget_micro_credits, dispatch.budget_run_time_ms) == (5_000, 4_500)
    assert unbudgeted.job_id == plain.job_id
    assert unbudgeted.price_per_gpu_hour_micro_credits == PRICE
    assert (unbudgeted.budget_micro_credits, unbudgeted.budget_run_time_ms) == (0, 0)


async def test_the_control_plane_stops_an_attempt_whose_daemon_ignored_its_budget(
    plane: JobPlane,
) -> None:
    """The host runs on past the budget's 2 s: the control plane's sweep asks it to stop at
    the deadline + its 2 s grace, asks again while it runs on, and whatever run time the
    daemon then reports, the job is charged exactly its budget."""
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job, dispatch = await budget_job(plane, host, 2_000)
        assert dispatch.budget_run_time_ms == 2_001  # 1,112 micro-credits pay for 2.0016 s
        await host.report(dispatch, K.JOB_REPORT_KIND_STARTING)
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        running_at = time.monotonic()
        cancel = await next_cancel(host)
        asked_after = time.monotonic() - running_at
        assert (cancel.job_id, cancel.attempt) == (job.job_id, 1)
        assert cancel.stop_reason == K.STOP_REASON_BUDGET_EXHAUSTED
        assert 3.8 <= asked_after < 6.0, asked_after  # 2 s budget + 2 s grace (+ a tick)
        # Still running: asked again.
        again = await next_cancel(host)
        assert again.stop_reason == K.STOP_REASON_BUDGET_EXHAUSTED
        assert time.monotonic() - running_at >= 8.5
        await host.report(
            dispatch,
            K.JOB_REPORT_KIND_STOPPED,
            stop_reason=K.STOP_REASON_BUDGET_EXHAUSTED,
            reason="budget_exhausted",
            run_time_ms=600_000,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    budget = charge_for(PRICE, 1, 2_000)
    assert done.state_reason == "budget_exhausted"
    assert done.charged_micro_credits == budget == done.hold_micro_credits
    assert done.attempts[-1].charged_micro_credits == budget
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 100 * CREDIT - budget
    assert consumer.held_micro_credits == 0
    await plane.assert_ledger_consistent()


async def test_a_daemon_s_budget_stop_is_charged_exactly_the_budget_with_its_outputs(
    plane: JobPlane,
) -> None:
    """A daemon that stopped the job at its budget (Docker's run time a little short of it)
    is charged exactly the budget, and the outputs it stored are the job's results; no stop
    is sent for it."""
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job, dispatch = await budget_job(plane, host, 1_000)
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await plane.wait_for(job.job_id, [S.JOB_STATE_RUNNING])
        await asyncio.sleep(1.0)
        await host.report(dispatch, K.JOB_REPORT_KIND_UPLOADING, exit_code=137, run_time_ms=997)
        key = f"{dispatch.results_prefix}output/partial.txt"
        await host.report(
            dispatch,
            K.JOB_REPORT_KIND_FINISHED,
            exit_code=137,
            run_time_ms=997,
            stop_reason=K.STOP_REASON_BUDGET_EXHAUSTED,
            manifest=[S.ResultObject(key=key, path="output/partial.txt", size_bytes=8)],
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
        await asyncio.sleep(2.5)  # past the control plane's own deadline
        assert host.commands.empty()
    finally:
        await host.close()
    assert done.state_reason == "budget_exhausted"
    assert done.charged_micro_credits == charge_for(PRICE, 1, 1_000) == done.hold_micro_credits
    results = await plane.jobs.GetResults(
        jobs_pb2.GetResultsRequest(job_id=job.job_id), metadata=plane.auth(plane.consumer_key)
    )
    assert [(o.path, o.key) for o in results.objects] == [("output/partial.txt", key)]
    await plane.assert_ledger_consistent()


async def test_a_budget_stop_claimed_early_is_charged_only_what_ran(plane: JobPlane) -> None:
    """A daemon that says "budget exhausted" long before the control plane's clock reaches
    the budget's run time is charged the run time it reports, not the whole budget."""
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job, dispatch = await budget_job(plane, host, 60_000)
        await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            dispatch,
            K.JOB_REPORT_KIND_FINISHED,
            exit_code=137,
            run_time_ms=3_000,
            stop_reason=K.STOP_REASON_BUDGET_EXHAUSTED,
        )
        done = await plane.wait_for(job.job_id, [S.JOB_STATE_FAILED])
    finally:
        await host.close()
    assert done.charged_micro_credits == charge_for(PRICE, 1, 3_000)
    assert done.hold_micro_credits == charge_for(PRICE, 1, 60_000)


async def test_a_retry_has_what_the_failed_attempt_left_of_the_budget(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        job, first = await budget_job(plane, host, 10_000, max_retries=1, retry_on_exit_codes=[3])
        assert first.budget_run_time_ms == 10_000
        await host.report(first, K.JOB_REPORT_KIND_RUNNING)
        await host.report(
            first,
            K.JOB_REPORT_KIND_FINISHED,
            exit_code=3,
            run_time_ms=4_000,
            stop_reason=K.STOP_REASON_EXITED_WITH_ERROR,
        )
        second = await host.next_dispatch()
    finally:
        await host.close()
    assert (second.job_id, second.attempt) == (job.job_id, 2)
    left = charge_for(PRICE, 1, 10_000) - charge_for(PRICE, 1, 4_000)
    assert second.budget_micro_credits == left
    assert second.budget_run_time_ms == budget_run_ms(left, PRICE, 1)
