"""Topping up a pending hold (a session extended), on SQLite and PostgreSQL: the hold and the
held balance grow by the amount and its expiry moves; no credit, no room under the monthly
spending limit, or a resolved hold: refused, and nothing moved."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.errors import Conflict, FailedPrecondition
from controlplane.ledger.limits import SpendingLimitExceeded
from controlplane.ledger.models import Hold
from tests.controlplane.ledger.conftest import CREDIT, Ledger, cost


async def top_up(ledger: Ledger, hold: Hold, amount: int, key: str) -> int:
    """In a transaction of its own, as ExtendSession's; the expiry one hour later."""
    expiry = hold.expires_at + timedelta(hours=1)

    async def work(session: AsyncSession) -> int:
        return await ledger.service.top_up(session, hold.id, amount, key, expiry)

    return await ledger.db.run(work)


async def test_a_top_up_grows_the_hold_or_changes_nothing(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer", 10)
    hold = await ledger.hold(consumer, 4 * CREDIT)
    assert await top_up(ledger, hold, 3 * CREDIT, f"{hold.id}/extend/1") == 7 * CREDIT
    grown = await ledger.service.get_hold(hold.id)
    assert grown.amount == 7 * CREDIT
    assert grown.expires_at == hold.expires_at + timedelta(hours=1)
    balance = await ledger.service.balance(consumer)
    assert (balance.available, balance.held) == (3 * CREDIT, 7 * CREDIT)

    with pytest.raises(FailedPrecondition, match="insufficient funds"):
        await top_up(ledger, hold, 4 * CREDIT, f"{hold.id}/extend/2")
    await ledger.service.set_spending_limit(consumer, 8 * CREDIT, [])
    with pytest.raises(SpendingLimitExceeded):
        await top_up(ledger, hold, 2 * CREDIT, f"{hold.id}/extend/3")
    assert (await ledger.service.get_hold(hold.id)).amount == 7 * CREDIT
    balance = await ledger.service.balance(consumer)
    assert (balance.available, balance.held) == (3 * CREDIT, 7 * CREDIT)

    provider = ledger.tenant("provider")
    await ledger.service.settle_hold(hold.id, cost(provider, 5 * CREDIT), group_commit=False)
    with pytest.raises(Conflict):
        await top_up(ledger, hold, CREDIT, f"{hold.id}/extend/4")
    balance = await ledger.service.balance(consumer)
    assert (balance.available, balance.held) == (5 * CREDIT, 0)  # 7 held, 5 charged
    report = await ledger.service.check()
    assert report.consistent
    assert report.mismatches == []
