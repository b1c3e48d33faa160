"""All SQL for ledger accounts and transfers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.ledger.models import Account, Transfer


class LedgerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def ensure_account(
        self, account_id: str, tenant_id: str, kind: str, no_overdraft: bool
    ) -> None:
        """Creates the account unless it exists (safe under concurrent creators)."""
        dialect = self.session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        statement = (
            insert(Account)
            .values(
                id=account_id, tenant_id=tenant_id, kind=kind, balance=0, no_overdraft=no_overdraft
            )
            .on_conflict_do_nothing(index_elements=["id"])
        )
        await self.session.execute(statement)

    async def get_account(self, account_id: str) -> Account | None:
        return await self.session.get(Account, account_id)

    async def accounts_of(self, tenant_id: str) -> Sequence[Account]:
        return (
            await self.session.scalars(select(Account).where(Account.tenant_id == tenant_id))
        ).all()

    async def apply_delta(
        self, account_id: str, delta: int, *, guard_overdraft: bool
    ) -> int | None:
        """Adds `delta` to a balance; returns the new balance, or None when the guard refused."""
        statement = update(Account).where(Account.id == account_id)
        if guard_overdraft and delta < 0:
            statement = statement.where(
                or_(Account.no_overdraft.is_(False), Account.balance + delta >= 0)
            )
        result = await self.session.execute(
            statement.values(balance=Account.balance + delta).returning(Account.balance)
        )
        return result.scalar_one_or_none()

    async def transfer_by_key(self, key: str) -> Transfer | None:
        return await self.session.scalar(select(Transfer).where(Transfer.idempotency_key == key))

    def add(self, transfer: Transfer) -> None:
        self.session.add(transfer)

    async def entries(
        self,
        account_ids: Sequence[str],
        kinds: Sequence[str],
        job_id: str | None,
        start: datetime | None,
        end: datetime | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> Sequence[Transfer]:
        query = select(Transfer).where(
            or_(
                Transfer.debit_account_id.in_(account_ids),
                Transfer.credit_account_id.in_(account_ids),
            )
        )
        if kinds:
            query = query.where(Transfer.kind.in_(kinds))
        if job_id:
            query = query.where(Transfer.job_id == job_id)
        if start:
            query = query.where(Transfer.created_at >= start)
        if end:
            query = query.where(Transfer.created_at < end)
        if before:
            query = query.where(
                or_(
                    Transfer.created_at < before[0],
                    (Transfer.created_at == before[0]) & (Transfer.id < before[1]),
                )
            )
        query = query.order_by(Transfer.created_at.desc(), Transfer.id.desc()).limit(limit)
        return (await self.session.scalars(query)).all()

    async def all_accounts(self) -> Sequence[Account]:
        return (await self.session.scalars(select(Account).order_by(Account.id))).all()

    async def recomputed_balances(self) -> dict[str, int]:
        """Every account's balance recomputed from the transfers alone."""
        credits = await self.session.execute(
            select(Transfer.credit_account_id, func.sum(Transfer.amount)).group_by(
                Transfer.credit_account_id
            )
        )
        debits = await self.session.execute(
            select(Transfer.debit_account_id, func.sum(Transfer.amount)).group_by(
                Transfer.debit_account_id
            )
        )
        totals: dict[str, int] = {}
        for account_id, amount in credits:
            totals[account_id] = totals.get(account_id, 0) + int(amount)
        for account_id, amount in debits:
            totals[account_id] = totals.get(account_id, 0) - int(amount)
        return totals

    async def transfer_count(self) -> int:
        return int(await self.session.scalar(select(func.count()).select_from(Transfer)) or 0)
