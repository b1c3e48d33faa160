"""All SQL for tenants' monthly spending limits and the alerts recorded at their thresholds."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.ledger.models import Account, SpendingAlert, SpendingLimit, Transfer
from controlplane.ledger.transfers import AccountKind, TransferKind, account_id

SPENDING = (TransferKind.CHARGE.value, TransferKind.FEE.value)


class SpendingRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @property
    def postgres(self) -> bool:
        return self.session.get_bind().dialect.name == "postgresql"

    async def limit(self, tenant_id: str, *, lock: bool = False) -> SpendingLimit | None:
        """The tenant's limit; `lock`: its row is locked (every hold of a limited tenant
        takes this lock, so concurrent holds see each other's)."""
        query = select(SpendingLimit).where(SpendingLimit.tenant_id == tenant_id)
        if lock:
            query = query.with_for_update()
        return (await self.session.scalars(query.execution_options(populate_existing=True))).first()

    async def limits(self) -> Sequence[SpendingLimit]:
        query = select(SpendingLimit).order_by(SpendingLimit.tenant_id)
        return (await self.session.scalars(query)).all()

    async def put_limit(
        self, tenant_id: str, monthly_limit: int, alert_percents: str, now: datetime
    ) -> None:
        insert_ = pg_insert if self.postgres else sqlite_insert
        values = {"monthly_limit": monthly_limit, "alert_percents": alert_percents}
        statement = (
            insert_(SpendingLimit)
            .values(tenant_id=tenant_id, updated_at=now, **values)
            .on_conflict_do_update(index_elements=["tenant_id"], set_={**values, "updated_at": now})
        )
        await self.session.execute(statement)

    async def drop_limit(self, tenant_id: str) -> None:
        await self.session.execute(
            delete(SpendingLimit).where(SpendingLimit.tenant_id == tenant_id)
        )

    async def month(self, tenant_id: str, start: datetime) -> tuple[int, int]:
        """(spent, held) in one statement, so one snapshot: a charge committing meanwhile
        (held → spent) is counted once. Spent: charges and fees out of the tenant's held
        account since `start`, less refunds to its held (a provider fault) or available
        (RefundJob) account since then."""
        held = account_id(tenant_id, AccountKind.HELD)
        available = account_id(tenant_id, AccountKind.AVAILABLE)
        charges = (
            select(func.coalesce(func.sum(Transfer.amount), 0))
            .where(
                Transfer.debit_account_id == held,
                Transfer.created_at >= start,
                Transfer.kind.in_(SPENDING),
            )
            .scalar_subquery()
        )
        refunds = (
            select(func.coalesce(func.sum(Transfer.amount), 0))
            .where(
                Transfer.credit_account_id.in_((held, available)),
                Transfer.created_at >= start,
                Transfer.kind == TransferKind.REFUND.value,
            )
            .scalar_subquery()
        )
        balance = (
            select(func.coalesce(func.sum(Account.balance), 0))
            .where(Account.id == held)
            .scalar_subquery()
        )
        row = (await self.session.execute(select(charges - refunds, balance))).one()
        return int(row[0]), int(row[1])

    async def alerts(self, tenant_id: str, month: str) -> Sequence[SpendingAlert]:
        query = (
            select(SpendingAlert)
            .where(SpendingAlert.tenant_id == tenant_id, SpendingAlert.month == month)
            .order_by(SpendingAlert.percent)
        )
        return (await self.session.scalars(query)).all()

    async def record_alerts(self, rows: Sequence[SpendingAlert]) -> list[int]:
        """Inserts the alerts not recorded yet (safe under concurrent recorders); the
        percents this call recorded."""
        if not rows:
            return []
        insert_ = pg_insert if self.postgres else sqlite_insert
        statement = (
            insert_(SpendingAlert)
            .values(
                [
                    {
                        "tenant_id": r.tenant_id,
                        "month": r.month,
                        "percent": r.percent,
                        "spent": r.spent,
                        "monthly_limit": r.monthly_limit,
                        "created_at": r.created_at,
                    }
                    for r in rows
                ]
            )
            .on_conflict_do_nothing(index_elements=["tenant_id", "month", "percent"])
            .returning(SpendingAlert.percent)
        )
        return sorted((await self.session.scalars(statement)).all())
