"""Two-phase holds, metering, provider-fault refunds, refunds, payouts and replays, on SQLite
and PostgreSQL, driven through the ledger's own services."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from controlplane.db.base import utcnow
from controlplane.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.service import REVENUE, split_fee
from controlplane.ledger.states import HoldState, PayoutState
from tests.controlplane.ledger.conftest import CREDIT, FEE_BP, Ledger, cost


async def revenue(ledger: Ledger) -> int:
    async with ledger.db.read() as session:
        account = await LedgerRepository(session).get_account(REVENUE)
    return account.balance if account is not None else 0


async def assert_consistent(ledger: Ledger) -> None:
    report = await ledger.service.check()
    assert report.mismatches == []
    assert report.balance_sum == 0
    assert report.consistent


async def test_metering_in_steps_splits_the_fee_like_one_charge(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 10 * CREDIT)
    steps = [1_234_567, 2_345_679, 2_345_679, 1_000_000, 3_456_791]  # a replay, a lower total
    charged = [await ledger.service.charge_hold(hold.id, cost(provider, c)) for c in steps]
    assert [c.amount for c in charged] == [1_234_567, 1_111_112, 0, 0, 1_111_112]
    assert not any(c.exhausted for c in charged)
    done = await ledger.service.settle_hold(hold.id, cost(provider, 4_000_003), group_commit=True)
    assert done.state is HoldState.POSTED
    assert done.charged.amount == 4_000_003 - 3_456_791
    assert (done.posted, done.released) == (4_000_003, 10 * CREDIT - 4_000_003)
    share, fee = split_fee(4_000_003, FEE_BP)
    assert (await ledger.service.balance(provider)).earnings == share
    assert await revenue(ledger) == fee
    balance = await ledger.service.balance(consumer)
    assert (balance.available, balance.held) == (100 * CREDIT - 4_000_003, 0)
    await assert_consistent(ledger)


async def test_charges_stop_at_the_hold_and_report_exhaustion(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 1000)
    first = await ledger.service.charge_hold(hold.id, cost(provider, 600))
    assert (first.amount, first.remaining, first.exhausted) == (600, 400, False)
    second = await ledger.service.charge_hold(hold.id, cost(provider, 1500))
    assert (second.amount, second.remaining, second.exhausted) == (400, 0, True)
    done = await ledger.service.settle_hold(hold.id, cost(provider, 2500), group_commit=True)
    assert (done.charged.amount, done.posted, done.released) == (0, 1000, 0)
    assert (await ledger.service.balance(consumer)).available == 100 * CREDIT - 1000
    await assert_consistent(ledger)


async def test_void_releases_everything_and_a_resolved_hold_never_changes(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 5 * CREDIT)
    assert (await ledger.service.balance(consumer)).held == 5 * CREDIT
    voided = await ledger.service.settle_hold(hold.id, None, group_commit=True)
    assert (voided.state, voided.released, voided.replay) == (HoldState.VOIDED, 5 * CREDIT, False)
    after = await ledger.service.balance(consumer)
    assert (after.available, after.held) == (100 * CREDIT, 0)
    # Nothing touches it any more: charge, refund, settle and expiry all find it resolved.
    assert (await ledger.service.charge_hold(hold.id, cost(provider, 100))).amount == 0
    assert await ledger.service.refund_hold_attempt(hold.id, 1) == 0
    again = await ledger.service.settle_hold(
        hold.id, cost(provider, 100), HoldState.EXPIRED, group_commit=True
    )
    assert (again.state, again.replay) == (HoldState.VOIDED, True)
    assert await ledger.service.balance(consumer) == after
    await assert_consistent(ledger)


async def test_concurrent_resolutions_resolve_a_hold_exactly_once(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 2 * CREDIT)
    calls = [
        ledger.service.settle_hold(hold.id, cost(provider, 500_000 + n), group_commit=True)
        for n in range(12)
    ]
    calls += [ledger.service.settle_hold(hold.id, None, group_commit=True) for _ in range(4)]
    results = await asyncio.gather(*calls)
    winners = [r for r in results if not r.replay]
    assert len(winners) == 1
    assert {(r.state, r.posted, r.released) for r in results} == {
        (winners[0].state, winners[0].posted, winners[0].released)
    }
    balance = await ledger.service.balance(consumer)
    assert balance.available == 100 * CREDIT - winners[0].posted
    assert balance.held == 0
    async with ledger.db.read() as session:
        count = await session.scalar(
            text(
                "SELECT count(*) FROM transfers WHERE kind = 'release' AND idempotency_key LIKE :k"
            ),
            {"k": f"hold/{hold.id}/%"},
        )
    assert count == 1
    await assert_consistent(ledger)


async def test_a_provider_fault_refunds_the_attempt_into_the_hold(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 1 * CREDIT)
    await ledger.service.charge_hold(hold.id, cost(provider, 700_000, attempt=1))
    assert (await ledger.service.balance(provider)).earnings == split_fee(700_000, FEE_BP)[0]
    assert await ledger.service.refund_hold_attempt(hold.id, 1) == 700_000
    assert await ledger.service.refund_hold_attempt(hold.id, 1) == 0  # exactly once
    assert (await ledger.service.balance(provider)).earnings == 0
    assert await revenue(ledger) == 0
    assert (await ledger.service.get_hold(hold.id)).posted_amount == 0
    # The retry has the whole budget again, and the consumer pays for it alone.
    second = await ledger.service.charge_hold(hold.id, cost(provider, 1 * CREDIT, attempt=2))
    assert (second.amount, second.exhausted) == (1 * CREDIT, True)
    # A late charge of the lost attempt changes nothing.
    assert (await ledger.service.charge_hold(hold.id, cost(provider, 900_000))).amount == 0
    done = await ledger.service.settle_hold(
        hold.id, cost(provider, 1 * CREDIT, attempt=2), group_commit=True
    )
    assert (done.posted, done.released) == (1 * CREDIT, 0)
    assert (await ledger.service.balance(consumer)).available == 99 * CREDIT
    async with ledger.db.read() as session:
        refunds = await session.scalar(
            text("SELECT sum(amount) FROM transfers WHERE kind = 'refund'")
        )
    assert refunds == 700_000
    await assert_consistent(ledger)


async def test_earnings_still_refundable_are_not_payable(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 10 * CREDIT)
    await ledger.service.charge_hold(hold.id, cost(provider, 5 * CREDIT))
    with pytest.raises(FailedPrecondition, match="payable"):
        await ledger.service.payout(provider, 2 * CREDIT, "iban:1", "p1")
    await ledger.service.settle_hold(hold.id, cost(provider, 5 * CREDIT), group_commit=True)
    payout, balance = await ledger.service.payout(provider, 2 * CREDIT, "iban:1", "p1")
    assert payout.state == PayoutState.PENDING.value
    assert balance.earnings == split_fee(5 * CREDIT, FEE_BP)[0] - 2 * CREDIT
    await assert_consistent(ledger)


async def test_payouts_minimum_replay_and_reversal(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    hold = await ledger.hold(consumer, 10 * CREDIT)
    await ledger.service.settle_hold(hold.id, cost(provider, 10 * CREDIT), group_commit=True)
    earned = split_fee(10 * CREDIT, FEE_BP)[0]
    with pytest.raises(InvalidArgument, match="minimum payout"):
        await ledger.service.payout(provider, CREDIT - 1, "iban:1", "small")
    with pytest.raises(FailedPrecondition, match="insufficient earnings"):
        await ledger.service.payout(provider, earned + 1, "iban:1", "big")
    first, _ = await ledger.service.payout(provider, 3 * CREDIT, "iban:1", "k")
    again, balance = await ledger.service.payout(provider, 3 * CREDIT, "iban:1", "k")
    assert again.id == first.id
    assert again.transfer_id == first.transfer_id
    assert balance.earnings == earned - 3 * CREDIT
    with pytest.raises(AlreadyExists):
        await ledger.service.payout(provider, 4 * CREDIT, "iban:1", "k")
    reversed_, after = await ledger.service.fail_payout(first.id, "bank rejected the IBAN")
    assert after.earnings == earned
    assert reversed_.state == PayoutState.REVERSED.value
    assert reversed_.reversal_transfer_id
    assert (await ledger.service.balance(provider)).earnings == earned
    assert (await ledger.service.fail_payout(first.id, "again"))[0].state == "reversed"
    assert (await ledger.service.balance(provider)).earnings == earned  # reversed once
    with pytest.raises(FailedPrecondition, match="reversed"):
        await ledger.service.mark_payout_paid(first.id)
    second, _ = await ledger.service.payout(provider, 2 * CREDIT, "iban:2", "k2")
    paid = await ledger.service.mark_payout_paid(second.id)
    assert paid.state == PayoutState.PAID.value
    assert (await ledger.service.mark_payout_paid(second.id)).state == "paid"
    with pytest.raises(NotFound):
        await ledger.service.fail_payout("po_missing", "x")
    await assert_consistent(ledger)


async def test_refund_job_in_parts_never_more_than_charged(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    job_id = ledger.tenant("job")
    hold = await ledger.hold(consumer, 10 * CREDIT, job_id=job_id)
    with pytest.raises(NotFound):
        await ledger.service.refund_job("job_unknown", 0, "why", "r0")
    with pytest.raises(FailedPrecondition, match="not settled"):
        await ledger.service.refund_job(job_id, 0, "early", "r0")
    await ledger.service.settle_hold(hold.id, cost(provider, 4 * CREDIT), group_commit=True)
    paid = 100 * CREDIT - 4 * CREDIT
    part = await ledger.service.refund_job(job_id, 1 * CREDIT, "slow GPU", "r1")
    assert part.refunded == 1 * CREDIT
    assert part.balance.available == paid + 1 * CREDIT
    share, fee = split_fee(4 * CREDIT, FEE_BP)
    assert (await ledger.service.balance(provider)).earnings == share - 900_000
    assert await revenue(ledger) == fee - 100_000  # the fee part, in proportion
    replay = await ledger.service.refund_job(job_id, 1 * CREDIT, "slow GPU", "r1")
    assert (replay.transfer_id, replay.refunded) == (part.transfer_id, part.refunded)
    assert (await ledger.service.balance(consumer)).available == paid + 1 * CREDIT
    with pytest.raises(AlreadyExists):
        await ledger.service.refund_job(job_id, 2 * CREDIT, "slow GPU", "r1")
    with pytest.raises(FailedPrecondition, match="exceeds"):
        await ledger.service.refund_job(job_id, 3 * CREDIT + 1, "too much", "r2")
    rest = await ledger.service.refund_job(job_id, 0, "the rest", "r3")
    assert rest.refunded == 3 * CREDIT
    assert rest.balance.available == 100 * CREDIT
    with pytest.raises(FailedPrecondition, match="nothing left"):
        await ledger.service.refund_job(job_id, 0, "again", "r4")
    assert (await ledger.service.balance(provider)).earnings == 0
    assert await revenue(ledger) == 0
    await assert_consistent(ledger)


async def test_a_refund_after_a_payout_leaves_a_receivable(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    job_id = ledger.tenant("job")
    hold = await ledger.hold(consumer, 10 * CREDIT, job_id=job_id)
    await ledger.service.settle_hold(hold.id, cost(provider, 10 * CREDIT), group_commit=True)
    await ledger.service.payout(provider, 8 * CREDIT, "iban:1", "most")  # 1 credit left
    done = await ledger.service.refund_job(job_id, 0, "bad job", "r")
    assert done.refunded == 10 * CREDIT
    assert done.balance.available == 100 * CREDIT
    # The provider's 9 credits came back: 1 it still had, 8 it owes (the receivable).
    assert (await ledger.service.balance(provider)).earnings == -8 * CREDIT
    with pytest.raises(FailedPrecondition, match="receivable"):
        await ledger.service.payout(provider, CREDIT, "iban:1", "owed")
    # Its next earnings pay the receivable off before anything is payable again.
    for n in range(2):
        again = await ledger.hold(consumer, 5 * CREDIT, job_id=f"{job_id}-{n}")
        await ledger.service.settle_hold(again.id, cost(provider, 5 * CREDIT), group_commit=True)
    assert (await ledger.service.balance(provider)).earnings == CREDIT
    paid, balance = await ledger.service.payout(provider, CREDIT, "iban:1", "after")
    assert balance.earnings == 0
    await assert_consistent(ledger)


async def test_expired_holds_are_released_once(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    provider = ledger.tenant("provider")
    stale = await ledger.hold(consumer, 3 * CREDIT, expires_in=-1)
    charged = await ledger.hold(consumer, 2 * CREDIT, expires_in=-1)
    fresh = await ledger.hold(consumer, 1 * CREDIT)
    await ledger.service.charge_hold(charged.id, cost(provider, 500_000))
    jobs = ledger.jobs()
    expired = await jobs.expire_holds()
    assert set(expired) >= {stale.id, charged.id}
    assert fresh.id not in expired
    assert await jobs.expire_holds() == []
    assert (await ledger.service.get_hold(stale.id)).state == HoldState.EXPIRED.value
    resolved = await ledger.service.get_hold(charged.id)
    assert (resolved.state, resolved.posted_amount) == (HoldState.EXPIRED.value, 500_000)
    balance = await ledger.service.balance(consumer)
    assert (balance.available, balance.held) == (99 * CREDIT - 500_000, 1 * CREDIT)
    await assert_consistent(ledger)


async def test_replays_change_nothing_and_answer_the_original(ledger: Ledger) -> None:
    consumer = ledger.tenant("consumer")
    provider = ledger.tenant("provider")
    first, _ = await ledger.service.deposit(consumer, 50 * CREDIT, "wire 1", "d1")
    again, balance = await ledger.service.deposit(consumer, 50 * CREDIT, "wire 1", "d1")
    assert again.id == first.id
    assert balance.available == 50 * CREDIT
    with pytest.raises(AlreadyExists):
        await ledger.service.deposit(consumer, 51 * CREDIT, "wire 1", "d1")
    expires = utcnow() + timedelta(hours=1)
    hold = await ledger.service.hold_credit(consumer, 5 * CREDIT, "h1", expires, job_id="job-r")
    same = await ledger.service.hold_credit(consumer, 5 * CREDIT, "h1", expires, job_id="job-r")
    assert same.id == hold.id
    assert (await ledger.service.balance(consumer)).held == 5 * CREDIT
    with pytest.raises(AlreadyExists):
        await ledger.service.hold_credit(consumer, 6 * CREDIT, "h1", expires, job_id="job-r")
    settled = await ledger.service.settle_hold(
        hold.id, cost(provider, 2 * CREDIT), group_commit=True
    )
    before = await ledger.service.balance(consumer)
    replay = await ledger.service.settle_hold(
        hold.id, cost(provider, 2 * CREDIT), group_commit=True
    )
    assert replay.replay
    assert (replay.state, replay.posted, replay.released) == (
        settled.state,
        settled.posted,
        settled.released,
    )
    assert await ledger.service.balance(consumer) == before
    async with ledger.db.read() as session:
        transfers = await LedgerRepository(session).transfer_count()
    await ledger.service.refund_job("job-r", 0, "why", "rf")
    await ledger.service.refund_job("job-r", 0, "why", "rf")
    async with ledger.db.read() as session:
        assert await LedgerRepository(session).transfer_count() == transfers + 2  # share + fee
    await assert_consistent(ledger)


async def test_a_fresh_key_is_not_looked_up_but_still_never_holds_twice(ledger: Ledger) -> None:
    """A submit's hold key is made from the job's new id (`fresh_key`: no lookup). Should such
    a key ever be reused, the holds' unique key refuses the second hold and its transaction
    changes nothing, instead of the replay answer a looked-up key gets."""
    consumer = await ledger.funded("consumer")
    expires = utcnow() + timedelta(hours=1)
    job_id = ledger.tenant("job")  # a fresh id: the database is shared across tests

    async def place(amount: int) -> None:
        await ledger.db.run(
            lambda session: ledger.service.place_hold(
                session,
                tenant_id=consumer,
                amount=amount,
                key=f"job/{job_id}/hold",
                expires_at=expires,
                job_id=job_id,
                fresh_key=True,
            )
        )

    await place(5 * CREDIT)
    # PostgreSQL's unique violation is retried as a possible race, then answered Conflict.
    with pytest.raises((IntegrityError, Conflict)):
        await place(5 * CREDIT)
    balance = await ledger.service.balance(consumer)
    assert (balance.available, balance.held) == (95 * CREDIT, 5 * CREDIT)
    await assert_consistent(ledger)


async def test_check_finds_a_tampered_balance(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    async with ledger.db.transaction() as session:
        await session.execute(
            text("UPDATE accounts SET balance = balance + 1 WHERE id = :id"),
            {"id": f"{consumer}:available"},
        )
    report = await ledger.service.check()
    assert not report.consistent
    assert [m[0] for m in report.mismatches] == [f"{consumer}:available"]
