"""Two-phase holds: place (available → held), charge in increments while pending (metering),
refund a provider-fault attempt, and resolve exactly once (posted, voided or expired).

The mechanics behind LedgerService's hold methods (ledger/service.py), the one way in: call
them through it. Every function works inside the caller's transaction. Each locks its hold
rows first (in id order), then the accounts (in account-id order, in `post()`, which writes
the holds back in the same statement), and changes a hold only while it is still pending (a
conditional UPDATE): a replayed or racing call finds it resolved and moves no money."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from operator import attrgetter
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import new_id, utcnow
from controlplane.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound
from controlplane.ledger.limits import check_hold
from controlplane.ledger.models import Hold
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.repository_pg import HOLD_LOCK_COLUMNS, HOLD_WRITE_COLUMNS
from controlplane.ledger.states import HoldState, new_hold, resolution_of, resolve_holds
from controlplane.ledger.transfers import (
    REVENUE,
    AccountKind,
    NewTransfer,
    TransferKind,
    account_id,
    new_transfer_id,
    new_transfer_ids,
    post,
)

PENDING = HoldState.PENDING.value


@dataclass(frozen=True, slots=True)
class AttemptCost:
    """What one attempt has cost so far in total (cumulative), and who ran it."""

    provider_tenant_id: str
    attempt: int
    cost: int
    fee_basis_points: int


@dataclass(frozen=True, slots=True)
class Charged:
    """The outcome of charging a hold: what moved now, and where the hold stands after."""

    amount: int
    share: int
    fee: int
    # The attempt's total charge and the hold's unspent rest after this call.
    attempt_total: int
    remaining: int
    # The attempt's cost has reached what the hold allows: the job must be stopped.
    exhausted: bool


@dataclass(frozen=True, slots=True)
class Resolution:
    state: HoldState
    # Net charged from the hold in all, and what went back to available.
    posted: int
    released: int
    # What this call charged (nothing on a replay).
    charged: Charged
    # The hold was resolved before this call: nothing moved, the rest is as resolved then.
    replay: bool


@dataclass(frozen=True, slots=True)
class Settle:
    """One resolution to make: the final charge of `cost` (if any) and the release."""

    hold_id: str
    cost: AttemptCost | None
    # Transfer keys: `key`/charge and `key`/fee for the final charge; `release_key`.
    key: str
    release_key: str
    # None: POSTED when anything stays charged, else VOIDED.
    outcome: HoldState | None = None


NOTHING = Charged(0, 0, 0, 0, 0, False)


@dataclass(slots=True)
class _Hold:
    """A locked hold's money columns, changed in memory and written back in one UPDATE."""

    id: str
    tenant_id: str
    job_id: str | None
    amount: int
    posted_amount: int
    state: str
    attempt: int
    provider_tenant_id: str | None
    attempt_charged: int
    attempt_fee: int
    release_transfer_id: str | None
    updated_at: datetime
    resolved_at: datetime | None

    def row(self) -> tuple[Any, ...]:
        """The hold as written back (HOLD_WRITE_COLUMNS order)."""
        return _WRITTEN(self)

    @property
    def remaining(self) -> int:
        return self.amount - self.posted_amount


# Locked rows come in HOLD_LOCK_COLUMNS order, straight into _Hold(*row).
assert tuple(f.name for f in fields(_Hold)) == HOLD_LOCK_COLUMNS
_WRITTEN = attrgetter(*(column for column, _ in HOLD_WRITE_COLUMNS))


def hold_accounts(tenant_id: str) -> tuple[str, str]:
    return account_id(tenant_id, AccountKind.AVAILABLE), account_id(tenant_id, AccountKind.HELD)


async def place_hold(
    session: AsyncSession,
    *,
    tenant_id: str,
    amount: int,
    key: str,
    expires_at: datetime,
    job_id: str | None = None,
    fresh_key: bool = False,
) -> Hold:
    """Holds `amount` of the tenant's available credit (a pending hold). Idempotent by `key`;
    insufficient credit is FailedPrecondition, a hold past the tenant's monthly spending
    limit SpendingLimitExceeded (limits.check_hold). With `fresh_key` the caller made the key
    in this transaction (from a new job's id), so no hold can have it yet and it is not looked
    up (one round trip less per submit); the holds' unique key still refuses a reuse."""
    repo = LedgerRepository(session)
    existing = None if fresh_key else await repo.hold_by_key(key)
    if existing is not None:
        if (existing.tenant_id, existing.amount, existing.job_id) != (tenant_id, amount, job_id):
            raise AlreadyExists(f"idempotency_key {key!r} was already used for another hold")
        return existing
    available, held = hold_accounts(tenant_id)
    now = utcnow()
    await check_hold(session, tenant_id, amount, now)
    transfer_id = new_transfer_id() if amount else None
    hold = new_hold(
        id=new_id("hold"),
        key=key,
        tenant_id=tenant_id,
        job_id=job_id,
        amount=amount,
        posted_amount=0,
        attempt=0,
        provider_tenant_id=None,
        attempt_charged=0,
        attempt_fee=0,
        expires_at=expires_at,
        hold_transfer_id=transfer_id,
        release_transfer_id=None,
        created_at=now,
        updated_at=now,
        resolved_at=None,
    )
    await repo.insert_hold(hold)
    await post(
        session,
        [NewTransfer(available, held, amount, TransferKind.HOLD, key, job_id, id=transfer_id)],
    )
    return hold


async def _lock(repo: LedgerRepository, hold_ids: Sequence[str]) -> dict[str, _Hold]:
    holds = [_Hold(*row) for row in await repo.lock_holds(hold_ids)]
    return {hold.id: hold for hold in holds}


def _charge(hold: _Hold, cost: AttemptCost) -> Charged:
    """Charges `hold` (in memory) the increment that brings `cost.attempt` to `cost.cost` in
    total, capped at the hold's rest; an attempt once charged keeps its provider. The fee of
    an attempt is always split_fee(its total): increments telescope, so metering in steps
    rounds exactly like one charge would."""
    if hold.attempt > cost.attempt:  # a stale attempt: it may no longer charge this hold
        return Charged(0, 0, 0, 0, hold.remaining, False)
    same = hold.attempt == cost.attempt
    if same and hold.attempt_charged and hold.provider_tenant_id != cost.provider_tenant_id:
        raise FailedPrecondition(
            f"attempt {cost.attempt} of hold {hold.id} is charged to provider "
            f"{hold.provider_tenant_id}, not {cost.provider_tenant_id}"
        )
    charged, fee_so_far = (hold.attempt_charged, hold.attempt_fee) if same else (0, 0)
    target = max(charged, min(cost.cost, charged + hold.remaining))
    amount = target - charged
    fee = max(0, min(amount, target * cost.fee_basis_points // 10_000 - fee_so_far))
    hold.posted_amount += amount
    hold.attempt = cost.attempt
    hold.provider_tenant_id = cost.provider_tenant_id
    hold.attempt_charged = target
    hold.attempt_fee = fee_so_far + fee
    left = hold.remaining
    return Charged(amount, amount - fee, fee, target, left, left == 0 and cost.cost > 0)


def _charge_transfers(
    hold: _Hold, cost: AttemptCost, charged: Charged, key: str
) -> list[NewTransfer]:
    held = account_id(hold.tenant_id, AccountKind.HELD)
    earnings = account_id(cost.provider_tenant_id, AccountKind.EARNINGS)
    return [
        NewTransfer(
            held, earnings, charged.share, TransferKind.CHARGE, f"{key}/charge",
            hold.job_id, cost.attempt,
        ),
        NewTransfer(
            held, REVENUE, charged.fee, TransferKind.FEE, f"{key}/fee", hold.job_id, cost.attempt
        ),
    ]  # fmt: skip


async def charge(session: AsyncSession, hold_id: str, cost: AttemptCost, key: str) -> Charged:
    """Metering: charges the increment that brings the attempt's total to `cost.cost`,
    capped at what the hold has left (provider share → earnings, fee → revenue). Transfer
    keys are `key`/charge and `key`/fee; a replay (same or lower total) charges nothing."""
    repo = LedgerRepository(session)
    hold = (await _lock(repo, [hold_id])).get(hold_id)
    if hold is None:
        raise NotFound(f"no hold {hold_id!r}")
    if hold.state != PENDING:
        return NOTHING
    before = (hold.attempt, hold.provider_tenant_id, hold.attempt_charged)
    charged = _charge(hold, cost)
    changed = before != (hold.attempt, hold.provider_tenant_id, hold.attempt_charged)
    if changed:
        hold.updated_at = utcnow()
    moves = _charge_transfers(hold, cost, charged, key) if charged.amount else []
    await post(session, moves, holds=[hold.row()] if changed else ())
    return charged


async def refund_attempt(session: AsyncSession, hold_id: str, attempt: int, key: str) -> int:
    """A provider fault: everything `attempt` was charged goes back into the pending hold
    (REFUND transfers from the provider's earnings and the platform's revenue), so the
    consumer pays nothing for it and a retry has the whole budget. Returns the amount."""
    repo = LedgerRepository(session)
    hold = (await _lock(repo, [hold_id])).get(hold_id)
    if (
        hold is None
        or hold.state != PENDING
        or hold.attempt != attempt
        or not hold.attempt_charged
        or hold.provider_tenant_id is None
    ):
        return 0
    amount, fee = hold.attempt_charged, hold.attempt_fee
    hold.posted_amount -= amount
    hold.attempt_charged = hold.attempt_fee = 0
    hold.updated_at = utcnow()
    held = account_id(hold.tenant_id, AccountKind.HELD)
    earnings = account_id(hold.provider_tenant_id, AccountKind.EARNINGS)
    reason = f"provider fault: attempt {attempt} is not charged"
    await post(
        session,
        [
            NewTransfer(
                earnings, held, amount - fee, TransferKind.REFUND, f"{key}/share",
                hold.job_id, attempt, reason,
            ),
            NewTransfer(
                REVENUE, held, fee, TransferKind.REFUND, f"{key}/fee", hold.job_id, attempt, reason
            ),
        ],
        holds=[hold.row()],
    )  # fmt: skip
    return amount


async def settle_many(
    session: AsyncSession, requests: Sequence[Settle], *, commit: bool = False
) -> list[Resolution | None]:
    """Resolves pending holds, each exactly once, in one go: a statement to lock the holds
    (id order), then one (PostgreSQL) to move every balance, record every transfer and write
    the holds back, however many holds. Per request: the final charge of its cost (the increment
    over what metering charged), then the rest released held → available. A hold resolved
    already (before, or earlier in `requests`) is a replay and moves nothing; a hold that
    does not exist answers None. `commit`: the settlement is the transaction's only work, and
    its last statement commits it (see transfers.post)."""
    repo = LedgerRepository(session)
    holds = await _lock(repo, [r.hold_id for r in requests])
    now = utcnow()
    release_ids = iter(new_transfer_ids(len(requests)))
    moves: list[NewTransfer] = []
    resolving: dict[str, tuple[_Hold, HoldState]] = {}
    # Per request: what it charged and released; None where it resolves nothing.
    done: list[tuple[Charged, int] | None] = []
    for request in requests:
        hold = holds.get(request.hold_id)
        if hold is None or hold.state != PENDING or hold.id in resolving:
            done.append(None)
            continue
        charged = NOTHING
        if request.cost is not None:
            charged = _charge(hold, request.cost)
            if charged.amount:
                moves += _charge_transfers(hold, request.cost, charged, request.key)
        released = hold.remaining
        state = resolution_of(hold.posted_amount, request.outcome)
        resolving[hold.id] = (hold, state)
        hold.release_transfer_id = next(release_ids) if released else None
        available, held = hold_accounts(hold.tenant_id)
        moves.append(
            NewTransfer(
                held, available, released, TransferKind.RELEASE, request.release_key,
                hold.job_id, id=hold.release_transfer_id,
            )
        )  # fmt: skip
        done.append((charged, released))
    # Every edge checked before the one statement that writes the holds back is built.
    resolve_holds(list(resolving.values()), now)
    await post(session, moves, holds=[h.row() for h, _ in resolving.values()], commit=commit)
    return [_resolution(holds.get(r.hold_id), d) for r, d in zip(requests, done, strict=True)]


def _resolution(hold: _Hold | None, done: tuple[Charged, int] | None) -> Resolution | None:
    if hold is None:
        return None
    state = HoldState(hold.state)
    if done is None:  # resolved before this request: a replay
        return Resolution(state, hold.posted_amount, hold.remaining, NOTHING, True)
    charged, released = done
    return Resolution(state, hold.posted_amount, released, charged, False)


async def settle(
    session: AsyncSession,
    hold_id: str,
    *,
    cost: AttemptCost | None,
    key: str,
    release_key: str,
    outcome: HoldState | None = None,
) -> Resolution:
    """Resolves one pending hold exactly once (see `settle_many`)."""
    (result,) = await settle_many(session, [Settle(hold_id, cost, key, release_key, outcome)])
    if result is None:
        raise NotFound(f"no hold {hold_id!r}")
    return result


async def extend(session: AsyncSession, hold_id: str, expires_at: datetime) -> bool:
    """Moves a pending hold's expiry (a requeued job waits again)."""
    return await LedgerRepository(session).update_pending_hold(
        hold_id, expires_at=expires_at, updated_at=utcnow()
    )


async def top_up(
    session: AsyncSession, hold_id: str, amount: int, key: str, expires_at: datetime
) -> int:
    """Adds `amount` of the tenant's available credit to a pending hold (a session extended)
    and moves its expiry; returns the hold's new amount. Insufficient credit is
    FailedPrecondition, a hold past the monthly spending limit SpendingLimitExceeded: the
    caller's transaction then rolls back, nothing changed."""
    repo = LedgerRepository(session)
    hold = (await _lock(repo, [hold_id])).get(hold_id)
    if hold is None or hold.state != PENDING:
        raise Conflict(f"hold {hold_id!r} is no longer pending")
    now = utcnow()
    await check_hold(session, hold.tenant_id, amount, now)
    available, held = hold_accounts(hold.tenant_id)
    transfer = NewTransfer(available, held, amount, TransferKind.HOLD, key, hold.job_id)
    await post(session, [transfer])
    total = hold.amount + amount
    await repo.update_pending_hold(hold_id, amount=total, expires_at=expires_at, updated_at=now)
    return total
