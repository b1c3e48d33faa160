"""Monthly spending limits in the ledger, on SQLite and PostgreSQL: the budget's spent is the
month's charges and fees less refunds and its committed the held balance; a hold past the
limit is refused and moves nothing; thresholds are recorded once; concurrent holds of one
tenant never overshoot the limit together (PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import utcnow
from controlplane.errors import FailedPrecondition, InvalidArgument
from controlplane.ledger.limits import month_start
from controlplane.ledger.service import SpendingLimitExceeded
from tests.controlplane.ledger.conftest import CREDIT, Ledger, cost


async def test_the_budget_follows_holds_charges_and_refunds(ledger: Ledger) -> None:
    service = ledger.service
    consumer, provider = await ledger.funded("consumer"), ledger.tenant("provider")
    budget = await service.set_spending_limit(consumer, 20 * CREDIT, [])
    assert budget.alert_percents == (50, 80, 100)
    assert (budget.spent, budget.committed, budget.remaining) == (0, 0, 20 * CREDIT)
    assert budget.month_start == month_start(utcnow())

    first = await ledger.hold(consumer, 10 * CREDIT, job_id=f"job-{uuid.uuid4().hex[:8]}")
    await service.charge_hold(first.id, cost(provider, 4 * CREDIT))
    budget = await service.budget(consumer)
    assert (budget.spent, budget.committed, budget.remaining) == (
        4 * CREDIT,
        6 * CREDIT,
        10 * CREDIT,
    )

    before = await service.balance(consumer)
    with pytest.raises(SpendingLimitExceeded) as refused:
        await ledger.hold(consumer, 10 * CREDIT + 1)
    assert isinstance(refused.value, FailedPrecondition)
    assert "monthly limit of 20.000000 credits" in refused.value.message
    assert await service.balance(consumer) == before  # nothing moved
    second = await ledger.hold(consumer, 10 * CREDIT)  # exactly the room left
    assert (await service.budget(consumer)).remaining == 0

    # A provider fault gives the attempt's charge back: no longer spent.
    await service.refund_hold_attempt(first.id, 1)
    assert (await service.budget(consumer)).spent == 0
    await service.settle_hold(first.id, cost(provider, 5 * CREDIT, attempt=2), group_commit=False)
    await service.settle_hold(second.id, None, group_commit=False)
    budget = await service.budget(consumer)
    assert (budget.spent, budget.committed) == (5 * CREDIT, 0)
    # An admin refund of the settled job takes it off the month's spend too.
    assert first.job_id is not None
    await service.refund_job(first.job_id, 2 * CREDIT, "sorry", f"r-{first.id}")
    assert (await service.budget(consumer)).spent == 3 * CREDIT

    # No limit: nothing is refused, and the budget still reports the month.
    cleared = await service.set_spending_limit(consumer, 0, [])
    assert (cleared.monthly_limit, cleared.remaining, cleared.spent) == (0, 0, 3 * CREDIT)
    await ledger.hold(consumer, 50 * CREDIT)
    assert consumer not in await service.limited_tenants()
    assert (await service.check()).consistent


async def test_thresholds_are_recorded_once_each(ledger: Ledger) -> None:
    service = ledger.service
    consumer, provider = await ledger.funded("consumer"), ledger.tenant("provider")
    await service.set_spending_limit(consumer, 10 * CREDIT, [80, 25, 50])
    hold = await ledger.hold(consumer, 10 * CREDIT)
    await service.charge_hold(hold.id, cost(provider, 6 * CREDIT))

    async def record(usage: int) -> list[int]:
        now = utcnow()

        async def work(session: AsyncSession) -> list[int]:
            budget = await service.budget_in(session, consumer, now)
            return await service.record_alerts(session, budget, usage, now)

        return await ledger.db.run(work)

    assert await record(6 * CREDIT) == [25, 50]
    assert await record(6 * CREDIT) == []
    assert await record(8 * CREDIT) == [80]
    assert await record(10 * CREDIT) == []
    budget = await service.budget(consumer)
    assert [(a.percent, a.spent) for a in budget.alerts] == [
        (25, 6 * CREDIT),
        (50, 6 * CREDIT),
        (80, 8 * CREDIT),
    ]
    # A limit the month has already passed: its thresholds are recorded by the next check.
    lowered = await service.set_spending_limit(consumer, 5 * CREDIT, [100])
    assert [a.percent for a in lowered.alerts] == [25, 50, 80]
    assert await record(6 * CREDIT) == [100]


async def test_bad_limits_name_their_field(ledger: Ledger) -> None:
    consumer = await ledger.funded("consumer")
    cases = [
        (-1, [], "monthly_limit_micro_credits"),
        (10**18 + 1, [], "monthly_limit_micro_credits"),
        (CREDIT, [0], "alert_percents"),
        (CREDIT, [101], "alert_percents"),
        (CREDIT, list(range(1, 12)), "alert_percents"),
    ]
    for limit, percents, field in cases:
        with pytest.raises(InvalidArgument) as invalid:
            await ledger.service.set_spending_limit(consumer, limit, percents)
        assert invalid.value.field == field
    assert (await ledger.service.budget(consumer)).monthly_limit == 0


@pytest.mark.postgres
async def test_concurrent_holds_never_overshoot_the_limit(pg_ledger: Ledger) -> None:
    consumer = await pg_ledger.funded("consumer")
    await pg_ledger.service.set_spending_limit(consumer, 10 * CREDIT, [])
    outcomes = await asyncio.gather(
        *(pg_ledger.hold(consumer, 3 * CREDIT) for _ in range(8)), return_exceptions=True
    )
    placed = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, SpendingLimitExceeded)]
    assert (len(placed), len(refused)) == (3, 5)
    budget = await pg_ledger.service.budget(consumer)
    assert budget.committed == 9 * CREDIT
