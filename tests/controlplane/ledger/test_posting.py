"""Posting in one statement: all or nothing, accounts made on first use, array parameters."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.errors import Conflict, FailedPrecondition
from controlplane.ledger import repository_pg
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.transfers import (
    AccountKind,
    NewTransfer,
    TransferKind,
    account_id,
    new_transfer_id,
    post,
    post_rows,
)
from tests.controlplane.ledger.conftest import CREDIT, Ledger


def _row(debit: str, credit: str, amount: int, key: str) -> tuple[object, ...]:
    """A transfer row as LedgerRepository.post takes it (TRANSFER_INPUT_COLUMNS order)."""
    return (
        new_transfer_id(),
        debit,
        credit,
        amount,
        "charge",
        key,
        None,
        None,
        "",
        -amount,
        amount,
    )


async def test_a_post_that_cannot_apply_changes_nothing(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer", credits=1)
    available = account_id(consumer, AccountKind.AVAILABLE)
    held = account_id(consumer, AccountKind.HELD)
    missing = account_id(ledger.tenant("provider"), AccountKind.EARNINGS)
    async with ledger.db.transaction() as session:
        repo = LedgerRepository(session)
        overdraw = {available: -2 * CREDIT, held: 2 * CREDIT}
        rows = [_row(available, held, 2 * CREDIT, f"test/{consumer}/overdraw")]
        posted = await repo.post(overdraw, rows, (), utcnow())
        assert not posted.ok
        # The balances it would have left, so the caller can say what is short.
        assert posted.balances == {available: (-CREDIT, True), held: (2 * CREDIT, True)}
        to_missing = {available: -CREDIT, missing: CREDIT}
        rows = [_row(available, missing, CREDIT, f"test/{consumer}/missing")]
        posted = await repo.post(to_missing, rows, (), utcnow())
        assert not posted.ok
        assert set(posted.balances) == {available}
        # Neither changed a balance or recorded a transfer, even inside this transaction.
        account = await repo.get_account(available)
        assert account is not None
        assert account.balance == CREDIT
        assert await repo.transfers_by_key_prefix(f"test/{consumer}/") == []


async def test_post_creates_accounts_on_first_use_and_refuses_an_overdraft(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer", credits=1)
    available = account_id(consumer, AccountKind.AVAILABLE)
    earnings = account_id(ledger.tenant("provider"), AccountKind.EARNINGS)

    async def pay(session: AsyncSession, amount: int, key: str) -> list[str]:
        move = NewTransfer(available, earnings, amount, TransferKind.CHARGE, key)
        return await post(session, [move])

    await ledger.db.run(lambda session: pay(session, CREDIT // 4, f"test/{consumer}/1"))
    with pytest.raises(FailedPrecondition, match=f"{available} is short by 0.250000 credits"):
        await ledger.db.run(lambda session: pay(session, CREDIT, f"test/{consumer}/2"))
    async with ledger.db.read() as session:
        repo = LedgerRepository(session)
        balances = {a.id: a.balance for a in await repo.all_accounts()}
        assert (balances[available], balances[earnings]) == (CREDIT * 3 // 4, CREDIT // 4)
        assert len(await repo.transfers_by_key_prefix(f"test/{consumer}/")) == 1
    assert (await ledger.service.check()).consistent


async def test_post_rows_answer_the_balances_after_each_transfer(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer", credits=10)
    available = account_id(consumer, AccountKind.AVAILABLE)
    held = account_id(consumer, AccountKind.HELD)
    moves = [
        NewTransfer(available, held, 3 * CREDIT, TransferKind.HOLD, f"test/{consumer}/a"),
        NewTransfer(held, available, CREDIT, TransferKind.RELEASE, f"test/{consumer}/b"),
        NewTransfer(available, held, 0, TransferKind.HOLD, f"test/{consumer}/zero"),
        NewTransfer(available, held, 2 * CREDIT, TransferKind.HOLD, f"test/{consumer}/c"),
    ]
    rows = await ledger.db.run(lambda session: post_rows(session, moves))
    after = [(r["debit_balance_after"], r["credit_balance_after"]) for r in rows]
    assert after == [(7 * CREDIT, 3 * CREDIT), (2 * CREDIT, 8 * CREDIT), (6 * CREDIT, 4 * CREDIT)]
    async with ledger.db.read() as session:
        stored = await LedgerRepository(session).transfers_by_key_prefix(f"test/{consumer}/")
    assert sorted((t.debit_balance_after, t.credit_balance_after) for t in stored) == sorted(after)


@pytest.mark.postgres
async def test_array_parameters_reach_postgresql_intact(pg_ledger: Ledger) -> None:
    strings = [
        "plain", "", "NULL", None, 'a "quoted" word', "back\\slash", '\\"', "{braces},commas",
        "  spaced  ", "tab\tnew\nline\x01end", "ünïcödé ✓",
    ]  # fmt: skip
    numbers = [0, -5, 10**18, None]
    times = [utcnow(), utcnow() - timedelta(days=400), None]
    async with pg_ledger.db.transaction() as session:
        (row,) = await repository_pg.execute(
            session,
            "SELECT %(s)s::varchar[], %(n)s::bigint[], %(t)s::timestamptz[]",
            {
                "s": repository_pg.array_literal(strings),
                "n": repository_pg.array_literal(numbers, "bigint"),
                "t": repository_pg.array_literal(times, "timestamptz"),
            },
        )
    assert list(row) == [strings, numbers, times]


@pytest.mark.postgres
async def test_driver_errors_reach_the_unit_of_work_as_sqlalchemy_errors(pg_ledger: Ledger) -> None:
    consumer = await pg_ledger.funded("consumer")
    available = account_id(consumer, AccountKind.AVAILABLE)
    held = account_id(consumer, AccountKind.HELD)
    key = f"test/{consumer}/once"
    move = NewTransfer(available, held, CREDIT, TransferKind.HOLD, key)
    await pg_ledger.db.run(lambda session: post(session, [move]))
    # The key is taken: a unique violation, which the unit of work treats as a race to rerun.
    with pytest.raises(Conflict):
        await pg_ledger.db.run(lambda session: post(session, [move]), attempts=2)
    assert pg_ledger.db.retries["23505"] == 2
