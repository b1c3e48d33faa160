"""Payouts: earnings leaving the platform (earnings → external) as a PENDING payout, then
paid or reversed (external → earnings) through the payout state machine (ledger/states.py)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import new_id, utcnow
from controlplane.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from controlplane.ledger.balances import Balance, balance_in
from controlplane.ledger.external import lock_shards, shard_to_credit, shard_to_debit
from controlplane.ledger.models import Payout
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.states import PayoutState, new_payout, set_payout_state
from controlplane.ledger.transfers import (
    MAX_AMOUNT,
    AccountKind,
    NewTransfer,
    TransferKind,
    account_id,
    ensure_tenant_accounts,
    format_credits,
    new_transfer_id,
    post,
    scoped_key,
)


def validate_payout(amount: int, destination: str, min_payout: int) -> None:
    least = max(min_payout, 1)
    if amount < least:
        raise InvalidArgument(
            "amount_micro_credits", f"the minimum payout is {format_credits(least)} credits"
        )
    if amount > MAX_AMOUNT:
        raise InvalidArgument("amount_micro_credits", f"at most {MAX_AMOUNT}")
    if not destination:
        raise InvalidArgument("destination", "is required")


async def pay_out(
    session: AsyncSession, tenant_id: str, amount: int, destination: str, key: str, caller: str
) -> tuple[Payout, Balance]:
    """Moves earnings out, recorded as a PENDING payout; only earnings that no pending hold
    could still take back are payable. A replay of `key` (the `caller` tenant's) returns the
    payout as it is now."""
    repo = LedgerRepository(session)
    existing = await repo.payout_by_key(caller, key)
    if existing is not None:
        if (existing.tenant_id, existing.amount, existing.destination) != (
            tenant_id,
            amount,
            destination,
        ):
            raise AlreadyExists(f"idempotency_key {key!r} was already used for another payout")
        return existing, await balance_in(session, tenant_id)
    await ensure_tenant_accounts(session, tenant_id)
    earnings = account_id(tenant_id, AccountKind.EARNINGS)
    # Lock before reading the reservation so no charge or refund slips in between.
    balances = await lock_shards(repo, earnings)
    balance = balances.get(earnings, 0)
    payable = balance - await repo.unsettled_share(tenant_id)
    if amount > payable:
        raise FailedPrecondition(
            f"insufficient earnings: {format_credits(max(payable, 0))} credits are payable "
            f"({format_credits(balance)} earned, a negative balance being a receivable to "
            "pay off first, the rest still refundable on running jobs)"
        )
    now = utcnow()
    row = new_payout(
        id=new_id("po"),
        tenant_id=tenant_id,
        amount=amount,
        destination=destination,
        idempotency_key=key,
        idempotency_tenant_id=caller,
        transfer_id=new_transfer_id(),
        reversal_transfer_id=None,
        reason="",
        created_at=now,
        updated_at=now,
    )
    await repo.insert_payout(row)
    await post(
        session,
        [
            NewTransfer(
                earnings, shard_to_credit(balances), amount, TransferKind.PAYOUT,
                scoped_key("payout", row.id),
                reference=destination, id=row.transfer_id,
            )
        ],
    )  # fmt: skip
    return row, await balance_in(session, tenant_id)


async def mark_paid(session: AsyncSession, payout_id: str) -> Payout:
    """The payment processor confirmed the payout. Idempotent."""
    repo = LedgerRepository(session)
    row = await _locked(repo, payout_id)
    if row.state == PayoutState.PAID.value:
        return row
    if not await set_payout_state(repo, row, PayoutState.PAID):
        raise FailedPrecondition(f"payout {payout_id} is {row.state}, not pending")
    return await _reread(repo, payout_id)


async def reverse(session: AsyncSession, payout_id: str, reason: str) -> Payout:
    """The payment failed (or bounced): reversed by a PAYOUT_REVERSAL transfer
    (external → earnings), exactly once. Idempotent."""
    repo = LedgerRepository(session)
    row = await _locked(repo, payout_id)
    reversal = new_transfer_id()
    moved = await set_payout_state(
        repo, row, PayoutState.REVERSED, reversal_transfer_id=reversal, reason=reason[:500]
    )
    if not moved:
        return row  # already reversed
    earnings = account_id(row.tenant_id, AccountKind.EARNINGS)
    external = await shard_to_debit(repo, await lock_shards(repo, earnings), row.amount)
    await post(
        session,
        [
            NewTransfer(
                external, earnings, row.amount, TransferKind.PAYOUT_REVERSAL,
                scoped_key("payout", row.id, "reversal"), reference=reason[:500], id=reversal,
            )
        ],
    )  # fmt: skip
    return await _reread(repo, payout_id)


async def _locked(repo: LedgerRepository, payout_id: str) -> Payout:
    row = await repo.payout(payout_id, lock=True)
    if row is None:
        raise NotFound(f"payout_id: no payout {payout_id!r}")
    return row


async def _reread(repo: LedgerRepository, payout_id: str) -> Payout:
    row = await repo.payout(payout_id)
    assert row is not None
    return row
