"""Accounts and immutable double-entry transfers, in integer micro-credits: the one place that
moves money. Every balance change goes through `post()`, inside the caller's transaction."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import new_id, utcnow
from controlplane.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument
from controlplane.ledger.models import Transfer
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.repository_pg import TRANSFER_INPUT_COLUMNS, Posted

PLATFORM = "platform"
MICRO = 1_000_000
MS_PER_HOUR = 3_600_000
# Largest single amount accepted (1e12 credits); keeps every sum far inside int64.
MAX_AMOUNT = 10**18
# What a balance column holds (BIGINT, SQLite INTEGER): a post that would take a balance
# outside is refused (FailedPrecondition); the external account is sharded to stay inside.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
OUT_OF_RANGE = "22003"  # PostgreSQL's numeric_value_out_of_range
MAX_KEY_LENGTH = 200


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
    return f"{tenant_id}:{kind}"  # a StrEnum formats as its value (and faster than .value)


def kind_of(account: str) -> AccountKind:
    """The kind of an account id: "<tenant>:<kind>", or "<tenant>:<kind>/<n>" for shard n
    of a sharded account (the external one, ledger/external.py)."""
    return AccountKind(account.rpartition(":")[2].partition("/")[0])


def overdraft_allowed(kind: AccountKind) -> bool:
    """External accounts go negative as money enters; a provider's earnings go negative by a
    refund after a payout (a receivable, paid off by the next charges credited to it)."""
    return kind in (AccountKind.EXTERNAL, AccountKind.EARNINGS)


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


def format_credits(amount: int) -> str:
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), MICRO)
    return f"{sign}{whole}.{frac:06d}"


def scoped_key(*parts: object) -> str:
    """An idempotency key joined from parts; hashed when it would not fit the column."""
    key = "/".join(str(p) for p in parts)
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return f"{parts[0]}/sha256/{hashlib.sha256(key.encode()).hexdigest()}"


@dataclass(frozen=True, slots=True)
class NewTransfer:
    """A transfer to post: `amount` moves from `debit` to `credit`."""

    debit: str
    credit: str
    amount: int
    kind: TransferKind
    key: str
    job_id: str | None = None
    attempt: int | None = None
    reference: str = ""
    # Given when the caller must know the transfer's id before it is posted.
    id: str | None = None


def new_transfer_id() -> str:
    return new_id("tr")


def new_transfer_ids(count: int) -> list[str]:
    """`count` ids like new_transfer_id()'s, from one draw of randomness."""
    digits = secrets.token_hex(16 * count)
    return [f"tr_{digits[i : i + 32]}" for i in range(0, 32 * count, 32)]


async def ensure_tenant_accounts(session: AsyncSession, tenant_id: str) -> None:
    repo = LedgerRepository(session)
    for kind in (AccountKind.AVAILABLE, AccountKind.HELD, AccountKind.EARNINGS):
        await repo.ensure_account(
            account_id(tenant_id, kind), tenant_id, kind.value, not overdraft_allowed(kind)
        )
    await repo.ensure_account(REVENUE, PLATFORM, AccountKind.REVENUE.value, True)
    await repo.ensure_account(EXTERNAL, PLATFORM, AccountKind.EXTERNAL.value, False)


async def ensure_accounts(repo: LedgerRepository, account_ids: Sequence[str]) -> None:
    """Creates accounts named "<tenant>:<kind>[/<shard>]" unless they exist; only external
    and earnings accounts may go below zero (overdraft_allowed)."""
    for account in sorted(account_ids):
        tenant = account.rpartition(":")[0]
        kind = kind_of(account)  # a typo in an account id fails here, not in a balance
        await repo.ensure_account(account, tenant, kind.value, not overdraft_allowed(kind))


class AccountsMissing(Exception):
    """A committing post (`post(commit=True)`) found accounts missing: it ended the
    transaction having changed nothing; create `accounts` and run the work again."""

    def __init__(self, accounts: Sequence[str]) -> None:
        super().__init__(f"accounts missing: {', '.join(accounts)}")
        self.accounts = list(accounts)


async def post(
    session: AsyncSession,
    transfers: Sequence[NewTransfer],
    *,
    holds: Sequence[Sequence[Any]] = (),
    commit: bool = False,
) -> list[str]:
    """See `post_rows()`; returns the transfer ids, in order. `holds` (rows in
    HOLD_WRITE_COLUMNS order, locked by the caller) are written back in the same statement,
    only where still pending: all must be, or this raises Conflict.

    `commit`: the post is the last thing the transaction does and nothing before it wrote
    (only locked): PostgreSQL then commits in the post's own round trip, which keeps the
    accounts locked for no round trip more. Applied or not, the transaction ends there (a
    refusal rolls it back), and missing accounts raise AccountsMissing instead of being
    created."""
    rows, _, _ = await _post(session, transfers, holds, commit=commit)
    return [row[0] for row in rows]


async def post_rows(
    session: AsyncSession, transfers: Sequence[NewTransfer]
) -> list[dict[str, Any]]:
    """Posts `transfers` (zero amounts skipped) inside the caller's transaction, all or none.

    Every account involved is locked once, in account-id order, and changed once by its net
    delta, so concurrent posts never deadlock and a hot account (the platform fee account) is
    held only from that one statement (PostgreSQL) to the commit. An account that forbids
    overdraft and would end below zero raises FailedPrecondition, having changed nothing.

    Accounts are created on first use. No idempotency check here: callers guard with state
    (a hold's conditional UPDATE) or use `transfer()`; a duplicate key still fails on the
    unique index. Returns the transfer rows (column → value), in order."""
    rows, balances, now = await _post(session, transfers, ())
    names = [c for c, _ in TRANSFER_INPUT_COLUMNS[:-2]]
    out: list[dict[str, Any]] = []
    for row in rows:
        values = dict(zip(names, row, strict=False))
        debit, credit = values["debit_account_id"], values["credit_account_id"]
        values["debit_balance_after"] = balances[debit] + row[-2]
        values["credit_balance_after"] = balances[credit] + row[-1]
        values["created_at"] = now
        out.append(values)
    return out


async def _post(
    session: AsyncSession,
    transfers: Sequence[NewTransfer],
    holds: Sequence[Sequence[Any]],
    *,
    commit: bool = False,
) -> tuple[list[tuple[Any, ...]], dict[str, int], datetime]:
    """Posts; (the rows given to the repository, each account's balance before, the time)."""
    moves = [t for t in transfers if t.amount != 0]
    deltas: dict[str, int] = {}
    for t in moves:
        if t.amount < 0 or t.amount > MAX_AMOUNT:
            raise InvalidArgument("amount_micro_credits", f"must be between 1 and {MAX_AMOUNT}")
        deltas[t.debit] = deltas.get(t.debit, 0) - t.amount
        deltas[t.credit] = deltas.get(t.credit, 0) + t.amount
    # Each transfer's balances after, as the running change of its accounts in this post.
    running = dict.fromkeys(deltas, 0)
    fresh = iter(new_transfer_ids(sum(1 for t in moves if t.id is None)))
    rows: list[tuple[Any, ...]] = []
    for t in moves:
        running[t.debit] -= t.amount
        running[t.credit] += t.amount
        rows.append(
            (
                t.id or next(fresh), t.debit, t.credit, t.amount, t.kind.value, t.key,
                t.job_id, t.attempt, t.reference, running[t.debit], running[t.credit],
            )
        )  # fmt: skip
    if not rows and not holds:
        return [], {}, utcnow()
    repo = LedgerRepository(session)
    now = utcnow()
    posted = await _post_in_range(repo, deltas, rows, holds, now, commit=commit)
    missing = [a for a in deltas if a not in posted.balances]
    if missing:
        if commit and repo.postgres:
            raise AccountsMissing(missing)
        await ensure_accounts(repo, missing)
        posted = await _post_in_range(repo, deltas, rows, holds, now)
    if not posted.ok:
        for account, (balance, no_overdraft) in sorted(posted.balances.items()):
            if not INT64_MIN <= balance <= INT64_MAX:
                raise _out_of_range(account)
            if no_overdraft and balance < 0:
                short = format_credits(-balance)
                raise FailedPrecondition(
                    f"insufficient funds: {account} is short by {short} credits"
                )
        if missing:
            raise Conflict(f"accounts missing after they were created: {missing}")
        raise Conflict("a hold changed under its lock")
    # The holds and accounts are locked by this transaction: only a broken invariant gets
    # to either (and the unit of work then rolls back what the statement did).
    if posted.holds_written != len(holds):
        raise Conflict("a hold changed under its lock")
    if posted.transfers_recorded != len(rows):
        raise Conflict(f"{posted.transfers_recorded} of {len(rows)} transfers were recorded")
    before = {a: posted.balances[a][0] - d for a, d in deltas.items()}
    return rows, before, now


def _out_of_range(account: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"amount_micro_credits: the balance of {account} would leave the range a balance "
        f"can hold (±{format_credits(INT64_MAX)} credits)"
    )


async def _post_in_range(
    repo: LedgerRepository,
    deltas: dict[str, int],
    rows: Sequence[Sequence[Any]],
    holds: Sequence[Sequence[Any]],
    now: datetime,
    *,
    commit: bool = False,
) -> Posted:
    """repo.post; a balance PostgreSQL could not hold (bigint out of range, which aborts the
    transaction) is FailedPrecondition, never INTERNAL. SQLite's twin reports it as refused."""
    try:
        return await repo.post(deltas, rows, holds, now, commit=commit)
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) != OUT_OF_RANGE:
            raise
        moved = ", ".join(sorted(deltas))
        raise _out_of_range(moved) from error


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
    replay with others is ALREADY_EXISTS. Zero amounts record nothing and return None."""
    if amount == 0:
        return None
    existing = await LedgerRepository(session).transfer_by_key(key)
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
    move = NewTransfer(debit, credit, amount, kind, key, job_id, attempt, reference)
    (row,) = await post_rows(session, [move])
    return Transfer(**row)
