"""A tenant's balances: its available, held and earnings accounts read together."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.transfers import AccountKind


@dataclass(frozen=True, slots=True)
class Balance:
    tenant_id: str
    available: int
    held: int
    earnings: int


async def balance_in(session: AsyncSession, tenant_id: str) -> Balance:
    accounts = {a.kind: a.balance for a in await LedgerRepository(session).accounts_of(tenant_id)}
    return Balance(
        tenant_id=tenant_id,
        available=accounts.get(AccountKind.AVAILABLE.value, 0),
        held=accounts.get(AccountKind.HELD.value, 0),
        earnings=accounts.get(AccountKind.EARNINGS.value, 0),
    )
