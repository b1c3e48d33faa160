"""PostgreSQL under concurrency: the unit-of-work retry, idempotency races, group commit."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.errors import Conflict
from controlplane.ledger.holds import hold_accounts
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.repository_pg import HOLD_LOCK_COLUMNS, HOLD_WRITE_COLUMNS
from controlplane.ledger.service import REVENUE
from controlplane.ledger.transfers import NewTransfer, TransferKind, post
from tests.controlplane.ledger.conftest import CREDIT, Ledger, cost

pytestmark = pytest.mark.postgres


async def test_run_retries_a_deadlocked_unit_of_work(pg_ledger: Ledger) -> None:
    db = pg_ledger.db
    async with db.transaction() as session:
        await session.execute(text("CREATE TABLE pair (id int PRIMARY KEY, n int NOT NULL)"))
        await session.execute(text("INSERT INTO pair VALUES (1, 0), (2, 0)"))
    both_locked_first = asyncio.Barrier(2)
    runs = {1: 0, 2: 0}

    def crossing(first: int, second: int) -> object:
        async def work(session: AsyncSession) -> None:
            runs[first] += 1
            await session.execute(text("UPDATE pair SET n = n + 1 WHERE id = :i"), {"i": first})
            if runs[first] == 1:  # only the first run of each meets the other: a deadlock
                await both_locked_first.wait()
            await session.execute(text("UPDATE pair SET n = n + 1 WHERE id = :i"), {"i": second})

        return work

    await asyncio.wait_for(
        asyncio.gather(db.run(crossing(1, 2)), db.run(crossing(2, 1))),  # type: ignore[arg-type]
        timeout=30,
    )
    assert db.retries["40P01"] == 1
    assert sorted(runs.values()) == [1, 2]
    async with db.read() as session:
        assert (await session.execute(text("SELECT sum(n) FROM pair"))).scalar() == 4


async def test_run_gives_up_with_conflict(pg_ledger: Ledger) -> None:
    async def always_serialization_failure(session: AsyncSession) -> None:
        await session.execute(
            text("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = 'serialization_failure'; END $$")
        )

    with pytest.raises(Conflict):
        await pg_ledger.db.run(always_serialization_failure, attempts=3)
    assert pg_ledger.db.retries["40001"] == 3


async def test_concurrent_replays_of_one_key_move_money_once(pg_ledger: Ledger) -> None:
    service = pg_ledger.service
    consumer = pg_ledger.tenant("consumer")
    results = await asyncio.gather(
        *(service.deposit(consumer, 7 * CREDIT, "wire", "same-key") for _ in range(12))
    )
    assert len({transfer.id for transfer, _ in results}) == 1
    assert (await service.balance(consumer)).available == 7 * CREDIT
    provider = pg_ledger.tenant("provider")
    hold = await pg_ledger.hold(consumer, 5 * CREDIT, job_id=pg_ledger.tenant("job"))
    await service.settle_hold(hold.id, cost(provider, 4 * CREDIT), group_commit=True)
    payouts = await asyncio.gather(
        *(service.payout(provider, 1 * CREDIT, "iban:1", "payout-key") for _ in range(8))
    )
    assert len({(p.id, p.transfer_id) for p, _ in payouts}) == 1
    assert (await service.balance(provider)).earnings == 3_600_000 - 1 * CREDIT
    assert hold.job_id is not None
    refunds = await asyncio.gather(
        *(service.refund_job(hold.job_id, CREDIT, "dup", "refund-key") for _ in range(8))
    )
    assert len({(r.transfer_id, r.refunded) for r in refunds}) == 1
    assert (await service.balance(consumer)).available == 7 * CREDIT - 4 * CREDIT + CREDIT
    assert (await service.check()).consistent


async def test_concurrent_settlements_share_transactions(pg_ledger: Ledger) -> None:
    service = pg_ledger.service
    consumers = [await pg_ledger.funded(f"c{n}", credits=40) for n in range(10)]
    holds = [await pg_ledger.hold(consumers[n % 10], CREDIT) for n in range(300)]
    before = service.settlements.batches
    provider = pg_ledger.tenant("provider")
    results = await asyncio.gather(
        *(service.settle_hold(h.id, cost(provider, 100_000), group_commit=True) for h in holds)
    )
    assert all(not r.replay and r.released == 900_000 for r in results)
    assert service.settlements.batches - before < 300 / 4
    async with pg_ledger.db.read() as session:
        revenue = await LedgerRepository(session).get_account(REVENUE)
        assert revenue is not None
        assert revenue.balance == 300 * 10_000
        deadlocks = await session.scalar(
            text("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        )
    assert deadlocks == 0
    assert (await service.check()).consistent


async def test_one_failing_request_does_not_fail_its_batch(pg_ledger: Ledger) -> None:
    service = pg_ledger.service
    consumer = await pg_ledger.funded("consumer")
    holds = [await pg_ledger.hold(consumer, CREDIT) for _ in range(5)]
    provider = pg_ledger.tenant("provider")
    calls = [service.settle_hold(h.id, cost(provider, 10), group_commit=True) for h in holds]
    calls.insert(2, service.settle_hold("hold_missing", None, group_commit=True))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["Resolution"] * 2 + ["NotFound"] + [
        "Resolution"
    ] * 3


async def test_a_committing_settlement_creates_missing_accounts_and_settles_once(
    pg_ledger: Ledger,
) -> None:
    # The group-committed settlement commits in its post's round trip; a provider seen for
    # the first time has no earnings account, so that post commits having changed nothing,
    # the account is created, and the settlement runs again.
    service = pg_ledger.service
    consumer = await pg_ledger.funded("consumer")
    hold = await pg_ledger.hold(consumer, CREDIT)
    provider = pg_ledger.tenant("new-provider")
    async with pg_ledger.db.read() as session:
        assert await LedgerRepository(session).accounts_of(provider) == []
    done = await service.settle_hold(hold.id, cost(provider, 300_000), group_commit=True)
    assert (done.posted, done.released, done.replay) == (300_000, 700_000, False)
    async with pg_ledger.db.read() as session:
        repo = LedgerRepository(session)
        earnings = await repo.get_account(f"{provider}:earnings")
        assert earnings is not None
        assert earnings.balance == 270_000
        moved = await repo.transfers_by_key_prefix(f"hold/{hold.id}/")
    assert sorted(t.kind for t in moved) == ["charge", "fee", "release"]
    assert (await service.check()).consistent
    again = await service.settle_hold(hold.id, cost(provider, 300_000), group_commit=True)
    assert again.replay
    assert again.posted == 300_000


async def test_a_hold_written_behind_the_lock_makes_the_post_change_nothing(
    pg_ledger: Ledger,
) -> None:
    # A committing post is committed whatever it answers, so it must refuse as a whole (and
    # move no money) when a hold it writes back is no longer pending.
    consumer = await pg_ledger.funded("consumer")
    hold = await pg_ledger.hold(consumer, CREDIT)
    balance = await pg_ledger.service.balance(consumer)
    available, held = hold_accounts(consumer)

    async def work(session: AsyncSession) -> None:
        (row,) = await LedgerRepository(session).lock_holds([hold.id])
        locked = list(row)
        # What no caller does: the hold resolved inside the lock, behind the post's back.
        await session.execute(
            text("UPDATE holds SET state = 'voided' WHERE id = :i"), {"i": hold.id}
        )
        written = dict(zip(HOLD_LOCK_COLUMNS, locked, strict=True))
        written["state"] = "posted"
        back = NewTransfer(held, available, CREDIT, TransferKind.RELEASE, "k-release", hold.job_id)
        await post(
            session, [back], holds=[[written[c] for c, _ in HOLD_WRITE_COLUMNS]], commit=True
        )

    with pytest.raises(Conflict, match="a hold changed under its lock"):
        await pg_ledger.db.run(work)
    assert await pg_ledger.service.balance(consumer) == balance
    async with pg_ledger.db.read() as session:
        assert await LedgerRepository(session).transfers_by_key_prefix("k-release") == []
