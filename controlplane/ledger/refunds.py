"""Refunds of a settled job's charges: from the provider's earnings and the platform's
revenue (the fee part), in proportion, back to the consumer; idempotent by key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from controlplane.ledger.balances import Balance, balance_in
from controlplane.ledger.models import Hold, Transfer
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.states import HoldState
from controlplane.ledger.transfers import (
    MAX_AMOUNT,
    AccountKind,
    NewTransfer,
    TransferKind,
    account_id,
    format_credits,
    post,
    scoped_key,
)


@dataclass(frozen=True, slots=True)
class Refund:
    transfer_id: str
    refunded: int
    balance: Balance


def allocate(amount: int, parts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Splits `amount` over (account, refundable) parts in proportion, rounding down, the
    rounding rest to the largest parts first; never more than a part's refundable."""
    total = sum(r for _, r in parts)
    shares = [(a, amount * r // total, r) for a, r in parts]
    rest = amount - sum(s for _, s, _ in shares)
    out: list[tuple[str, int]] = []
    for account, share, refundable in sorted(shares, key=lambda p: -p[2]):
        extra = min(rest, refundable - share)
        rest -= extra
        out.append((account, share + extra))
    return out


def validate_refund(amount: int) -> None:
    if amount < 0 or amount > MAX_AMOUNT:
        raise InvalidArgument("amount_micro_credits", f"must be between 0 and {MAX_AMOUNT}")


async def refund_job(
    session: AsyncSession, job_id: str, amount: int, reason: str, key: str, caller: str
) -> Refund:
    """Returns up to everything charged for a settled job, minus what was refunded
    already, to the consumer's available account (see LedgerService.refund_job); `key` is
    the `caller` tenant's."""
    prefix = scoped_key("refund", caller, key) + "/"
    repo = LedgerRepository(session)
    hold = await repo.hold_of_job(job_id, lock=True)  # serialises refunds of a job
    if hold is None:
        raise NotFound(f"job_id: no charges recorded for job {job_id!r}")
    done = await repo.transfers_by_key_prefix(prefix)
    if done:
        return await _replay(session, hold, done, amount, key)
    if hold.state == HoldState.PENDING.value:
        raise FailedPrecondition(
            f"job {job_id} is not settled yet (its hold is pending): refund it once it has ended"
        )
    refundable = await _refundable(repo, job_id)
    left = sum(r for _, r in refundable)
    wanted = amount or left
    if left <= 0:
        raise FailedPrecondition(f"nothing left to refund for job {job_id}")
    if wanted > left:
        raise FailedPrecondition(
            f"amount_micro_credits: {format_credits(wanted)} exceeds what is left to "
            f"refund for job {job_id} ({format_credits(left)} credits: charged minus "
            "refunded)"
        )
    consumer = account_id(hold.tenant_id, AccountKind.AVAILABLE)
    moves = [
        NewTransfer(
            source, consumer, part, TransferKind.REFUND, f"{prefix}{n}", job_id,
            reference=reason,
        )
        for n, (source, part) in enumerate(allocate(wanted, refundable))
        if part
    ]  # fmt: skip
    await _lock_accounts(repo, consumer, moves)
    ids = await post(session, moves)
    return Refund(ids[0], wanted, await balance_in(session, hold.tenant_id))


async def _lock_accounts(
    repo: LedgerRepository, consumer: str, moves: Sequence[NewTransfer]
) -> None:
    """Every account of the refund, locked in account-id order (as post() would). A provider
    paid out already may not cover its part: its earnings then go below zero, a receivable
    that its next charges pay off (and no payout is possible until they have)."""
    await repo.lock_balances([consumer, *(m.debit for m in moves)])


async def _refundable(repo: LedgerRepository, job_id: str) -> list[tuple[str, int]]:
    """(account, amount) still refundable per account credited by the job's charges."""
    net: dict[str, int] = {}
    for kind, debit, credit, total in await repo.job_flows(job_id):
        if kind in (TransferKind.CHARGE.value, TransferKind.FEE.value):
            net[credit] = net.get(credit, 0) + total
        elif kind == TransferKind.REFUND.value:
            net[debit] = net.get(debit, 0) - total
    return sorted((a, n) for a, n in net.items() if n > 0)


async def _replay(
    session: AsyncSession, hold: Hold, done: Sequence[Transfer], amount: int, key: str
) -> Refund:
    total = sum(t.amount for t in done)
    if done[0].job_id != hold.job_id or (amount and amount != total):
        raise AlreadyExists(f"idempotency_key {key!r} was already used for another refund")
    return Refund(done[0].id, total, await balance_in(session, hold.tenant_id))
