"""Per-tenant monthly spending limits: the month's budget, the check every hold makes, and
the alerts recorded once per tenant, month and threshold."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.errors import FailedPrecondition, InvalidArgument
from controlplane.ledger.limits_repository import SpendingRepository
from controlplane.ledger.models import SpendingAlert
from controlplane.ledger.transfers import MAX_AMOUNT, format_credits

DEFAULT_ALERT_PERCENTS = (50, 80, 100)
MAX_ALERTS = 10


@dataclass(frozen=True, slots=True)
class Alert:
    percent: int
    spent: int
    monthly_limit: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Budget:
    """A tenant's month against its limit (`monthly_limit` 0: none)."""

    tenant_id: str
    monthly_limit: int
    alert_percents: tuple[int, ...]
    month_start: datetime
    # Charges and fees this month less refunds this month.
    spent: int
    # What pending holds still reserve (the held balance).
    committed: int
    alerts: tuple[Alert, ...] = ()

    @property
    def remaining(self) -> int:
        if not self.monthly_limit:
            return 0
        return max(0, self.monthly_limit - self.spent - self.committed)


class SpendingLimitExceeded(FailedPrecondition):
    """A hold would take the month's spend and holds past the tenant's limit."""

    def __init__(self, budget: Budget, amount: int) -> None:
        self.budget = budget
        self.amount = amount
        super().__init__(
            f"spending limit: a hold of {format_credits(amount)} credits would take this "
            f"month past the monthly limit of {format_credits(budget.monthly_limit)} credits "
            f"({format_credits(budget.spent)} spent, {format_credits(budget.committed)} held "
            f"by running or queued jobs, {format_credits(budget.remaining)} left)"
        )


def month_start(now: datetime) -> datetime:
    """The first instant of `now`'s calendar month, UTC."""
    now = now.astimezone(UTC)
    return datetime(now.year, now.month, 1, tzinfo=UTC)


def month_key(now: datetime) -> str:
    return month_start(now).strftime("%Y-%m")


def validate_limit(monthly_limit: int, alert_percents: Sequence[int]) -> tuple[int, ...]:
    """The alert percents to store (ascending, defaults when none); InvalidArgument naming
    the field otherwise."""
    if not 0 <= monthly_limit <= MAX_AMOUNT:
        raise InvalidArgument(
            "monthly_limit_micro_credits", f"must be between 0 (no limit) and {MAX_AMOUNT}"
        )
    if len(alert_percents) > MAX_ALERTS:
        raise InvalidArgument("alert_percents", f"at most {MAX_ALERTS} thresholds")
    if any(not 1 <= p <= 100 for p in alert_percents):
        raise InvalidArgument("alert_percents", "each must be between 1 and 100")
    return tuple(sorted(set(alert_percents))) or DEFAULT_ALERT_PERCENTS


def parse_percents(stored: str) -> tuple[int, ...]:
    return tuple(int(p) for p in stored.split(",") if p)


async def budget_in(
    session: AsyncSession, tenant_id: str, now: datetime, *, for_hold: bool = False
) -> Budget:
    """The tenant's budget for `now`'s month. `for_hold`: its limit row is locked first and
    the alerts are not read (a hold's check needs neither)."""
    repo = SpendingRepository(session)
    row = await repo.limit(tenant_id, lock=for_hold)
    start = month_start(now)
    alerts = await repo.alerts(tenant_id, month_key(now)) if row and not for_hold else ()
    spent, held = await repo.month(tenant_id, start)
    return Budget(
        tenant_id=tenant_id,
        monthly_limit=row.monthly_limit if row is not None else 0,
        alert_percents=parse_percents(row.alert_percents) if row is not None else (),
        month_start=start,
        spent=spent,
        committed=held,
        alerts=tuple(Alert(a.percent, a.spent, a.monthly_limit, a.created_at) for a in alerts),
    )


async def check_hold(session: AsyncSession, tenant_id: str, amount: int, now: datetime) -> None:
    """Refuses (SpendingLimitExceeded) a hold of `amount` that would take the month's spend
    and holds past the tenant's limit. The limit's row stays locked to the end of the
    transaction, so two holds of one tenant cannot both fit in the same room. Charges move
    held → spent and releases and refunds only lower the sum, so holds alone can raise it.
    A tenant without a limit costs one primary-key read; with one, a second statement."""
    if amount <= 0:
        return
    repo = SpendingRepository(session)
    row = await repo.limit(tenant_id, lock=True)
    if row is None:
        return
    spent, held = await repo.month(tenant_id, month_start(now))
    if spent + held + amount > row.monthly_limit:
        budget = await budget_in(session, tenant_id, now)
        raise SpendingLimitExceeded(budget, amount)


async def record_alerts(
    session: AsyncSession, budget: Budget, usage: int, now: datetime
) -> list[int]:
    """Records each threshold `usage` (the month's spend, with what running jobs have run up)
    has reached and that is not recorded yet; the percents this call recorded."""
    if not budget.monthly_limit:
        return []
    seen = {a.percent for a in budget.alerts}
    due = [
        SpendingAlert(
            tenant_id=budget.tenant_id,
            month=month_key(now),
            percent=p,
            spent=usage,
            monthly_limit=budget.monthly_limit,
            created_at=now,
        )
        for p in budget.alert_percents
        if p not in seen and usage * 100 >= budget.monthly_limit * p
    ]
    return await SpendingRepository(session).record_alerts(due)


async def set_limit(
    session: AsyncSession,
    tenant_id: str,
    monthly_limit: int,
    alert_percents: Sequence[int],
    now: datetime,
) -> Budget:
    """Sets (0: removes) the tenant's limit; returns the budget after. Thresholds the month
    has already reached are recorded by the next check (jobs/spending.py), like any other,
    so that one place records and counts them."""
    percents = validate_limit(monthly_limit, alert_percents)
    repo = SpendingRepository(session)
    if monthly_limit:
        await repo.put_limit(tenant_id, monthly_limit, ",".join(map(str, percents)), now)
    else:
        await repo.drop_limit(tenant_id)
    return await budget_in(session, tenant_id, now)
