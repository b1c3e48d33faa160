"""Statements: each transfer as one line per leg on the accounts asked for, so that any
account's lines sum to its balance."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from controlplane.ledger.models import Account, Transfer
from controlplane.ledger.transfers import PLATFORM, AccountKind, kind_of

TENANT_KINDS = (AccountKind.AVAILABLE, AccountKind.HELD, AccountKind.EARNINGS)
PLATFORM_KINDS = (AccountKind.REVENUE, AccountKind.EXTERNAL)


@dataclass(frozen=True, slots=True)
class Entry:
    """One leg of a transfer, seen from one account: `amount` is negative when debited."""

    transfer: Transfer
    account_id: str
    account_kind: AccountKind
    amount: int
    balance_after: int


def statement_accounts(
    tenant_id: str, accounts: Sequence[Account], kinds: Sequence[AccountKind]
) -> list[str]:
    """The tenant's accounts a statement covers: those of `kinds`, or all of its own (the
    platform's: revenue and every external shard)."""
    wanted = set(kinds or (PLATFORM_KINDS if tenant_id == PLATFORM else TENANT_KINDS))
    return sorted(a.id for a in accounts if AccountKind(a.kind) in wanted)


def legs(rows: Iterable[Transfer], accounts: Sequence[str]) -> list[Entry]:
    """Each transfer's legs on `accounts`: a hold (available → held) is two lines, −X on
    available and +X on held; a transfer to another tenant one."""
    mine = set(accounts)
    out: list[Entry] = []
    for row in rows:
        if row.credit_account_id in mine:
            out.append(
                Entry(
                    row, row.credit_account_id, kind_of(row.credit_account_id), row.amount,
                    row.credit_balance_after,
                )
            )  # fmt: skip
        if row.debit_account_id in mine:
            out.append(
                Entry(
                    row, row.debit_account_id, kind_of(row.debit_account_id), -row.amount,
                    row.debit_balance_after,
                )
            )  # fmt: skip
    return out
