"""A tenant's balances: its available, held and earnings accounts read together."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.ledger.models import Account
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.transfers import AccountKind


@dataclass(frozen=True, slots=True)
class AccountBalance:
    account_id: str
    kind: AccountKind
    balance: int


@dataclass(frozen=True, slots=True)
class Balance:
    tenant_id: str
    available: int
    held: int
    # Negative: a receivable (a refund after a payout), paid off by the next charges.
    earnings: int
    # Every account of the tenant (the platform's revenue and external shards included).
    accounts: tuple[AccountBalance, ...] = ()


async def balance_in(session: AsyncSession, tenant_id: str) -> Balance:
    rows = await LedgerRepository(session).accounts_of(tenant_id)
    accounts = tuple(
        AccountBalance(a.id, AccountKind(a.kind), a.balance) for a in sorted(rows, key=_order)
    )
    by_kind = {a.kind: a.balance for a in rows}
    return Balance(
        tenant_id=tenant_id,
        available=by_kind.get(AccountKind.AVAILABLE.value, 0),
        held=by_kind.get(AccountKind.HELD.value, 0),
        earnings=by_kind.get(AccountKind.EARNINGS.value, 0),
        accounts=accounts,
    )


def _order(account: Account) -> tuple[int, int]:
    """Accounts in the order of AccountKind, shards by number."""
    return list(AccountKind).index(AccountKind(account.kind)), int(
        account.id.partition("/")[2] or 0
    )
