"""Payouts through the RPCs (listed, paid, failed with the money back), a refund after a
payout as a receivable the next earnings pay off, and deposits at int64's edge answering
clean codes while the external account shards; on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from gpuplane.v1 import ledger_pb2, messaging_pb2, types_pb2

from controlplane.ledger.service import MAX_AMOUNT, split_fee
from devstack.factories import new_key, new_tenant
from tests.controlplane.scripted_host import ScriptedHost, scripted_host
from tests.harness import CREDIT, JobPlane

K = messaging_pb2
PRICE = 2 * CREDIT  # per GPU-hour
FEE_BP = 1000  # the default platform fee
INT64_MAX = 2**63 - 1
pytestmark = pytest.mark.databases("sqlite", "postgresql")


async def run_hour(plane: JobPlane, host: ScriptedHost, hours: int = 1) -> types_pb2.Job:
    """`hours` GPU-hours on `host` (2 credits each), finished."""
    job = await plane.submit(gpu_count=1, max_duration_seconds=3600 * (hours + 1))
    dispatch = await host.next_dispatch()
    await host.report(dispatch, K.JOB_REPORT_KIND_RUNNING)
    await host.report(
        dispatch, K.JOB_REPORT_KIND_FINISHED, exit_code=0, run_time_ms=3_600_000 * hours
    )
    return await plane.wait_for(job.job_id, [types_pb2.JOB_STATE_SUCCEEDED])


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value.code()


async def statement_sums(plane: JobPlane, tenant: str) -> dict[str, int]:
    """Each account's statement lines summed, over every page."""
    sums: dict[str, int] = {}
    token = ""
    while True:
        reply = await plane.ledger.ListEntries(
            ledger_pb2.ListEntriesRequest(tenant_id=tenant, page_size=3, page_token=token),
            metadata=plane.auth(),
        )
        for e in reply.entries:
            sums[e.account_id] = sums.get(e.account_id, 0) + e.amount_micro_credits
        token = reply.next_page_token
        if not token:
            return sums


async def assert_statement_adds_up(plane: JobPlane, tenant: str) -> None:
    balance = await plane.balance(tenant)
    stored = {a.account_id: a.balance_micro_credits for a in balance.accounts}
    sums = await statement_sums(plane, tenant)
    assert {a: sums.get(a, 0) for a in stored} == stored
    assert set(sums) <= set(stored)


async def test_payouts_are_listed_paid_and_failed_with_the_money_back(plane: JobPlane) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    try:
        await run_hour(plane, host, hours=2)
    finally:
        await host.close()
    earned = split_fee(4 * CREDIT, FEE_BP)[0]
    provider = plane.auth(await new_key(plane, plane.provider_tenant, types_pb2.ROLE_PROVIDER))
    admin = plane.auth()
    ids = []
    for key in ("a", "b"):
        made = await plane.ledger.Payout(
            ledger_pb2.PayoutRequest(
                amount_micro_credits=CREDIT, destination=f"iban:{key}", idempotency_key=key
            ),
            metadata=provider,
        )
        ids.append(made.payout_id)
    listed = await plane.ledger.ListPayouts(ledger_pb2.ListPayoutsRequest(), metadata=provider)
    assert [p.payout_id for p in listed.payouts] == ids[::-1]  # newest first
    assert {p.state for p in listed.payouts} == {ledger_pb2.PAYOUT_STATE_PENDING}
    paid = await plane.ledger.MarkPayoutPaid(
        ledger_pb2.MarkPayoutPaidRequest(payout_id=ids[0]), metadata=admin
    )
    assert paid.payout.state == ledger_pb2.PAYOUT_STATE_PAID
    again = await plane.ledger.MarkPayoutPaid(
        ledger_pb2.MarkPayoutPaidRequest(payout_id=ids[0]), metadata=admin
    )
    assert again.payout == paid.payout  # idempotent
    failed = await plane.ledger.FailPayout(
        ledger_pb2.FailPayoutRequest(payout_id=ids[1], reason="account closed"), metadata=admin
    )
    assert failed.payout.state == ledger_pb2.PAYOUT_STATE_REVERSED
    assert failed.payout.reason == "account closed"
    assert failed.payout.reversal_transfer_id
    assert failed.balance.earnings_micro_credits == earned - CREDIT
    # A reversed payout is never paid; a paid one that bounced is reversed, once.
    assert (
        await code_of(
            plane.ledger.MarkPayoutPaid(
                ledger_pb2.MarkPayoutPaidRequest(payout_id=ids[1]), metadata=admin
            )
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    for _ in range(2):
        bounced = await plane.ledger.FailPayout(
            ledger_pb2.FailPayoutRequest(payout_id=ids[0], reason="bounced"), metadata=admin
        )
        assert bounced.balance.earnings_micro_credits == earned
    only_reversed = await plane.ledger.ListPayouts(
        ledger_pb2.ListPayoutsRequest(
            tenant_id=plane.provider_tenant, states=[ledger_pb2.PAYOUT_STATE_REVERSED]
        ),
        metadata=admin,
    )
    assert {p.payout_id for p in only_reversed.payouts} == set(ids)
    everyone = await plane.ledger.ListPayouts(
        ledger_pb2.ListPayoutsRequest(all_tenants=True, page_size=1), metadata=admin
    )
    assert len(everyone.payouts) == 1
    assert everyone.next_page_token
    for request, metadata, code in [
        (ledger_pb2.ListPayoutsRequest(all_tenants=True), provider,
         grpc.StatusCode.PERMISSION_DENIED),
        (ledger_pb2.ListPayoutsRequest(states=[99]), provider,  # type: ignore[list-item]
         grpc.StatusCode.INVALID_ARGUMENT),
    ]:  # fmt: skip
        assert await code_of(plane.ledger.ListPayouts(request, metadata=metadata)) == code
    missing = ledger_pb2.MarkPayoutPaidRequest(payout_id="po_missing")
    assert await code_of(plane.ledger.MarkPayoutPaid(missing, metadata=admin)) == (
        grpc.StatusCode.NOT_FOUND
    )
    no_reason = ledger_pb2.FailPayoutRequest(payout_id=ids[0])
    assert await code_of(plane.ledger.FailPayout(no_reason, metadata=admin)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert await code_of(plane.ledger.FailPayout(no_reason, metadata=provider)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    await assert_statement_adds_up(plane, plane.provider_tenant)
    await plane.assert_ledger_consistent()


async def test_a_refund_after_a_payout_is_a_receivable_the_next_earnings_pay_off(
    plane: JobPlane,
) -> None:
    host = await scripted_host(plane, price=PRICE, gpus=1)
    provider = plane.auth(await new_key(plane, plane.provider_tenant, types_pb2.ROLE_PROVIDER))
    earned = split_fee(2 * CREDIT, FEE_BP)[0]
    try:
        first = await run_hour(plane, host)
        await plane.ledger.Payout(
            ledger_pb2.PayoutRequest(
                amount_micro_credits=earned, destination="iban:x", idempotency_key="all"
            ),
            metadata=provider,
        )
        refund = await plane.ledger.RefundJob(
            ledger_pb2.RefundJobRequest(
                job_id=first.job_id, reason="wrong output", idempotency_key="r"
            ),
            metadata=plane.auth(),
        )
        assert refund.refunded_micro_credits == 2 * CREDIT
        owed = await plane.balance(plane.provider_tenant)
        assert owed.earnings_micro_credits == -earned  # the receivable
        nothing = ledger_pb2.PayoutRequest(
            amount_micro_credits=CREDIT, destination="iban:x", idempotency_key="more"
        )
        assert await code_of(plane.ledger.Payout(nothing, metadata=provider)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        await run_hour(plane, host)  # the next earnings pay it off
    finally:
        await host.close()
    assert (await plane.balance(plane.provider_tenant)).earnings_micro_credits == 0
    consumer = await plane.balance(plane.consumer_tenant)
    assert consumer.available_micro_credits == 98 * CREDIT  # refunded once, charged twice
    for tenant in (plane.provider_tenant, plane.consumer_tenant, "platform"):
        await assert_statement_adds_up(plane, tenant)
    await plane.assert_ledger_consistent()


async def test_deposits_past_int64_answer_clean_codes_and_shard_the_external_account(
    plane: JobPlane,
) -> None:
    admin = plane.auth()
    rich, _ = await new_tenant(plane, "rich", types_pb2.ROLE_CONSUMER)

    async def deposit(tenant: str, amount: int, key: str) -> ledger_pb2.DepositResponse:
        request = ledger_pb2.DepositRequest(
            tenant_id=tenant, amount_micro_credits=amount, idempotency_key=key
        )
        return await plane.ledger.Deposit(request, metadata=admin)

    for amount, code in [
        (INT64_MAX, grpc.StatusCode.INVALID_ARGUMENT),
        (MAX_AMOUNT + 1, grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        assert await code_of(deposit(rich, amount, f"big-{amount}")) == code
    for n in range(9):  # 9e18: inside int64
        await deposit(rich, MAX_AMOUNT, f"fill-{n}")
    assert await code_of(deposit(rich, MAX_AMOUNT, "over")) == grpc.StatusCode.FAILED_PRECONDITION
    assert (await plane.balance(rich)).available_micro_credits == 9 * MAX_AMOUNT
    # Another tenant's deposits take the money inside past what one int64 holds: the
    # external account gets a second shard instead of overflowing.
    other, _ = await new_tenant(plane, "other", types_pb2.ROLE_CONSUMER)
    for n in range(2):
        reply = await deposit(other, MAX_AMOUNT, f"other-{n}")
    assert reply.balance.available_micro_credits == 2 * MAX_AMOUNT
    again = await deposit(other, MAX_AMOUNT, "other-1")  # a replay moves nothing
    assert again.transfer_id == reply.transfer_id
    platform = await plane.balance("platform")
    external = {
        a.account_id: a.balance_micro_credits
        for a in platform.accounts
        if a.kind == types_pb2.ACCOUNT_KIND_EXTERNAL
    }
    assert len(external) == 2
    assert all(-(2**63) <= b <= 0 for b in external.values())
    inside = 100 * CREDIT + 11 * MAX_AMOUNT  # the harness's consumer's 100 credits included
    assert sum(external.values()) == -inside
    for tenant in (rich, other, "platform"):
        await assert_statement_adds_up(plane, tenant)
    await plane.assert_ledger_consistent()
