"""Double-entry transfers, holds and settlement, in integer micro-credits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from controlplane.ledger.models import Account, Transfer
from controlplane.ledger.repository import LedgerRepository

PLATFORM = "platform"
MICRO = 1_000_000
MS_PER_HOUR = 3_600_000
# Largest single amount accepted (1e12 credits); keeps every sum far inside int64.
MAX_AMOUNT = 10**18


class AccountKind(StrEnum):
    AVAILABLE = "available"
    HELD = "held"
    EARNINGS = "earnings"
    REVENUE = "revenue"
    EXTERNAL = "external"


class TransferKind(StrEnum):
    DEPOSIT = "deposit"
    HOLD = "hold"
    CHARGE = "charge"
    FEE = "fee"
    RELEASE = "release"
    REFUND = "refund"
    PAYOUT = "payout"
    PAYOUT_REVERSAL = "payout_reversal"


def account_id(tenant_id: str, kind: AccountKind) -> str:
    return f"{tenant_id}:{kind.value}"


REVENUE = account_id(PLATFORM, AccountKind.REVENUE)
EXTERNAL = account_id(PLATFORM, AccountKind.EXTERNAL)


def charge_for(price_per_gpu_hour: int, gpus: int, run_time_ms: int) -> int:
    """ceil(price × GPUs × run time in ms / 3,600,000), in integers only."""
    numerator = price_per_gpu_hour * max(gpus, 1) * run_time_ms
    return -(-numerator // MS_PER_HOUR)


def split_fee(charge: int, fee_basis_points: int) -> tuple[int, int]:
    """(provider share, platform fee); the fee rounds down, so the provider keeps the rest."""
    fee = charge * fee_basis_points // 10_000
    return charge - fee, fee


@dataclass(frozen=True, slots=True)
class Balance:
    tenant_id: str
    available: int
    held: int
    earnings: int


@dataclass(frozen=True, slots=True)
class CheckReport:
    consistent: bool
    account_count: int
    transfer_count: int
    balance_sum: int
    # (account, kind, tenant, stored, recomputed)
    mismatches: list[tuple[str, str, str, int, int]]


async def ensure_tenant_accounts(session: AsyncSession, tenant_id: str) -> None:
    repo = LedgerRepository(session)
    for kind in (AccountKind.AVAILABLE, AccountKind.HELD, AccountKind.EARNINGS):
        await repo.ensure_account(account_id(tenant_id, kind), tenant_id, kind.value, True)
    await repo.ensure_account(REVENUE, PLATFORM, AccountKind.REVENUE.value, True)
    await repo.ensure_account(EXTERNAL, PLATFORM, AccountKind.EXTERNAL.value, False)


async def transfer(
    session: AsyncSession,
    *,
    debit: str,
    credit: str,
    amount: int,
    kind: TransferKind,
    key: str,
    job_id: str | None = None,
    attempt: int | None = None,
    reference: str = "",
) -> Transfer | None:
    """Moves `amount` from `debit` to `credit` inside the caller's transaction.

    Idempotent by `key`: a replay with the same parameters returns the original transfer, a
    replay with others is ALREADY_EXISTS. Balances change in account-id order so concurrent
    transfers never deadlock. Zero amounts record nothing and return None."""
    if amount == 0:
        return None
    if amount < 0 or amount > MAX_AMOUNT:
        raise InvalidArgument("amount_micro_credits", f"must be between 1 and {MAX_AMOUNT}")
    repo = LedgerRepository(session)
    existing = await repo.transfer_by_key(key)
    if existing is not None:
        same = (
            existing.debit_account_id,
            existing.credit_account_id,
            existing.amount,
            existing.kind,
        )
        if same != (debit, credit, amount, kind.value):
            raise AlreadyExists(f"idempotency_key {key!r} was already used for another transfer")
        return existing
    after: dict[str, int] = {}
    for account, delta in sorted(((debit, -amount), (credit, amount))):
        balance = await repo.apply_delta(account, delta, guard_overdraft=True)
        if balance is None:
            raise FailedPrecondition(
                f"insufficient funds: {account} cannot cover {format_credits(amount)} credits"
            )
        after[account] = balance
    row = Transfer(
        id=new_id("tr"),
        debit_account_id=debit,
        credit_account_id=credit,
        amount=amount,
        kind=kind.value,
        idempotency_key=key,
        job_id=job_id,
        attempt=attempt,
        reference=reference,
        debit_balance_after=after[debit],
        credit_balance_after=after[credit],
        created_at=utcnow(),
    )
    repo.add(row)
    return row


def format_credits(amount: int) -> str:
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO)
    return f"{sign}{whole}.{frac:06d}"


async def balance_in(session: AsyncSession, tenant_id: str) -> Balance:
    accounts = {a.kind: a.balance for a in await LedgerRepository(session).accounts_of(tenant_id)}
    return Balance(
        tenant_id=tenant_id,
        available=accounts.get(AccountKind.AVAILABLE.value, 0),
        held=accounts.get(AccountKind.HELD.value, 0),
        earnings=accounts.get(AccountKind.EARNINGS.value, 0),
    )


class LedgerService:
    """Ledger operations that are requests of their own (deposits, statements, checks)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def deposit(
        self, tenant_id: str, amount: int, reference: str, key: str
    ) -> tuple[Transfer, Balance]:
        if amount <= 0:
            raise InvalidArgument("amount_micro_credits", "must be positive")
        async with self.db.transaction() as session:
            await ensure_tenant_accounts(session, tenant_id)
            row = await transfer(
                session,
                debit=EXTERNAL,
                credit=account_id(tenant_id, AccountKind.AVAILABLE),
                amount=amount,
                kind=TransferKind.DEPOSIT,
                key=f"deposit/{key}",
                reference=reference,
            )
            assert row is not None
            return row, await balance_in(session, tenant_id)

    async def balance(self, tenant_id: str) -> Balance:
        async with self.db.read() as session:
            return await balance_in(session, tenant_id)

    async def entries(
        self,
        tenant_id: str,
        account_kinds: Sequence[AccountKind],
        kinds: Sequence[TransferKind],
        job_id: str | None,
        start: datetime | None,
        end: datetime | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> Sequence[Transfer]:
        kinds_of_tenant = account_kinds or (
            AccountKind.AVAILABLE,
            AccountKind.HELD,
            AccountKind.EARNINGS,
        )
        if tenant_id == PLATFORM and not account_kinds:
            kinds_of_tenant = (AccountKind.REVENUE, AccountKind.EXTERNAL)
        ids = [account_id(tenant_id, k) for k in kinds_of_tenant]
        async with self.db.read() as session:
            return await LedgerRepository(session).entries(
                ids, [k.value for k in kinds], job_id, start, end, before, limit
            )

    async def check(self) -> CheckReport:
        """Recomputes every balance from the transfers and compares with the stored ones."""
        async with self.db.read() as session:
            repo = LedgerRepository(session)
            accounts: Sequence[Account] = await repo.all_accounts()
            recomputed = await repo.recomputed_balances()
            count = await repo.transfer_count()
        mismatches = [
            (a.id, a.kind, a.tenant_id, a.balance, recomputed.get(a.id, 0))
            for a in accounts
            if a.balance != recomputed.get(a.id, 0)
        ]
        total = sum(a.balance for a in accounts)
        return CheckReport(not mismatches and total == 0, len(accounts), count, total, mismatches)
