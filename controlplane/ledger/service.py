"""Ledger requests of their own: deposits, balances, statements, refunds, payouts, holds
(for callers without a job), the consistency check and usage reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from controlplane.ledger import holds
from controlplane.ledger.batch import GroupCommit
from controlplane.ledger.holds import AttemptCost, Charged, Resolution, Settle
from controlplane.ledger.models import Account, Hold, HoldState, Payout, PayoutState, Transfer
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.transfers import (
    EXTERNAL,
    MAX_AMOUNT,
    MICRO,
    MS_PER_HOUR,
    PLATFORM,
    REVENUE,
    AccountKind,
    AccountsMissing,
    NewTransfer,
    TransferKind,
    account_id,
    charge_for,
    ensure_accounts,
    ensure_tenant_accounts,
    format_credits,
    new_transfer_id,
    post,
    scoped_key,
    split_fee,
    transfer,
)
from controlplane.ledger.usage import UsageQuery, UsageReport, usage_report
from controlplane.paging import Page, PageRequest

__all__ = [
    "EXTERNAL",
    "MAX_AMOUNT",
    "MICRO",
    "MS_PER_HOUR",
    "PLATFORM",
    "REVENUE",
    "AccountKind",
    "Balance",
    "CheckReport",
    "LedgerService",
    "TransferKind",
    "account_id",
    "balance_in",
    "charge_for",
    "ensure_tenant_accounts",
    "format_credits",
    "split_fee",
    "transfer",
]

CONSUMER_SIDE = (AccountKind.AVAILABLE, AccountKind.HELD)


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


@dataclass(frozen=True, slots=True)
class Refund:
    transfer_id: str
    refunded: int
    balance: Balance


async def balance_in(session: AsyncSession, tenant_id: str) -> Balance:
    accounts = {a.kind: a.balance for a in await LedgerRepository(session).accounts_of(tenant_id)}
    return Balance(
        tenant_id=tenant_id,
        available=accounts.get(AccountKind.AVAILABLE.value, 0),
        held=accounts.get(AccountKind.HELD.value, 0),
        earnings=accounts.get(AccountKind.EARNINGS.value, 0),
    )


def _allocate(amount: int, parts: list[tuple[str, int]]) -> list[tuple[str, int]]:
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


def _no_hold(request: Settle) -> NotFound:
    return NotFound(f"no hold {request.hold_id!r}")


class LedgerService:
    """Ledger operations that are requests of their own."""

    def __init__(self, db: Database, *, min_payout: int = MICRO, max_batch: int = 128) -> None:
        self.db = db
        self.min_payout = min_payout
        # Concurrent settlements are group-committed: one transaction per batch.
        self.settlements = GroupCommit(self._settle_batch, max_batch=max_batch)

    # Deposits, balances, statements, check ------------------------------------------------

    async def deposit(
        self, tenant_id: str, amount: int, reference: str, key: str
    ) -> tuple[Transfer, Balance]:
        """Credits `amount` from outside (external → available); idempotent by `key`."""
        if amount <= 0:
            raise InvalidArgument("amount_micro_credits", "must be positive")

        async def work(session: AsyncSession) -> tuple[Transfer, Balance]:
            await ensure_tenant_accounts(session, tenant_id)
            row = await transfer(
                session,
                debit=EXTERNAL,
                credit=account_id(tenant_id, AccountKind.AVAILABLE),
                amount=amount,
                kind=TransferKind.DEPOSIT,
                key=scoped_key("deposit", key),
                reference=reference,
            )
            assert row is not None
            return row, await balance_in(session, tenant_id)

        return await self.db.run(work)

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
        page: PageRequest,
    ) -> Page[Transfer]:
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
                ids, [k.value for k in kinds], job_id, start, end, page
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

    # Refunds -------------------------------------------------------------------------------

    async def refund_job(self, job_id: str, amount: int, reason: str, key: str) -> Refund:
        """Returns up to everything charged for a settled job, minus what was refunded
        already, to the consumer's available account: REFUND transfers from the provider's
        earnings and from platform revenue (the fee part), in proportion. `amount` 0 =
        everything left. Idempotent by `key`."""
        if amount < 0 or amount > MAX_AMOUNT:
            raise InvalidArgument("amount_micro_credits", f"must be between 0 and {MAX_AMOUNT}")
        prefix = scoped_key("refund", key) + "/"

        async def work(session: AsyncSession) -> Refund:
            repo = LedgerRepository(session)
            hold = await repo.hold_of_job(job_id, lock=True)  # serialises refunds of a job
            if hold is None:
                raise NotFound(f"job_id: no charges recorded for job {job_id!r}")
            done = await repo.transfers_by_key_prefix(prefix)
            if done:
                return await self._refund_replay(session, hold, done, amount, key)
            if hold.state == HoldState.PENDING.value:
                raise FailedPrecondition(
                    f"job {job_id} is not settled yet (its hold is pending): refund it once it "
                    "has ended"
                )
            refundable = await self._refundable(repo, job_id)
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
                for n, (source, part) in enumerate(_allocate(wanted, refundable))
                if part
            ]  # fmt: skip
            # Every account of the refund, locked in account-id order (as post() would).
            balances = await repo.lock_balances([consumer, *(m.debit for m in moves)])
            for move in moves:
                if move.debit != REVENUE and balances.get(move.debit, 0) < move.amount:
                    raise FailedPrecondition(
                        f"the provider's earnings ({format_credits(balances.get(move.debit, 0))}"
                        f" credits in {move.debit}) cannot cover the refund of "
                        f"{format_credits(move.amount)} credits: it was paid out already"
                    )
            ids = await post(session, moves)
            return Refund(ids[0], wanted, await balance_in(session, hold.tenant_id))

        return await self.db.run(work)

    @staticmethod
    async def _refundable(repo: LedgerRepository, job_id: str) -> list[tuple[str, int]]:
        """(account, amount) still refundable per account credited by the job's charges."""
        net: dict[str, int] = {}
        for kind, debit, credit, total in await repo.job_flows(job_id):
            if kind in (TransferKind.CHARGE.value, TransferKind.FEE.value):
                net[credit] = net.get(credit, 0) + total
            elif kind == TransferKind.REFUND.value:
                net[debit] = net.get(debit, 0) - total
        return sorted((a, n) for a, n in net.items() if n > 0)

    async def _refund_replay(
        self,
        session: AsyncSession,
        hold: Hold,
        done: Sequence[Transfer],
        amount: int,
        key: str,
    ) -> Refund:
        total = sum(t.amount for t in done)
        if done[0].job_id != hold.job_id or (amount and amount != total):
            raise AlreadyExists(f"idempotency_key {key!r} was already used for another refund")
        return Refund(done[0].id, total, await balance_in(session, hold.tenant_id))

    # Payouts -------------------------------------------------------------------------------

    async def payout(
        self, tenant_id: str, amount: int, destination: str, key: str
    ) -> tuple[Payout, Balance]:
        """Moves earnings out (earnings → external), recorded as a PENDING payout. Only
        earnings that no pending hold could still take back are payable. Idempotent per
        tenant by `key`: a replay returns the payout as it is now."""
        if amount < max(self.min_payout, 1):
            raise InvalidArgument(
                "amount_micro_credits",
                f"the minimum payout is {format_credits(max(self.min_payout, 1))} credits",
            )
        if amount > MAX_AMOUNT:
            raise InvalidArgument("amount_micro_credits", f"at most {MAX_AMOUNT}")
        if not destination:
            raise InvalidArgument("destination", "is required")

        async def work(session: AsyncSession) -> tuple[Payout, Balance]:
            repo = LedgerRepository(session)
            existing = await repo.payout_by_key(tenant_id, key)
            if existing is not None:
                if (existing.amount, existing.destination) != (amount, destination):
                    raise AlreadyExists(
                        f"idempotency_key {key!r} was already used for another payout"
                    )
                return existing, await balance_in(session, tenant_id)
            await ensure_tenant_accounts(session, tenant_id)
            earnings = account_id(tenant_id, AccountKind.EARNINGS)
            # Lock before reading the reservation so no charge or refund slips in between.
            balance = (await repo.lock_balances([earnings, EXTERNAL])).get(earnings, 0)
            payable = balance - await repo.unsettled_share(tenant_id)
            if amount > payable:
                raise FailedPrecondition(
                    f"insufficient earnings: {format_credits(payable)} credits are payable "
                    f"({format_credits(balance)} earned, the rest still refundable on running "
                    "jobs)"
                )
            now = utcnow()
            row = Payout(
                id=new_id("po"),
                tenant_id=tenant_id,
                amount=amount,
                destination=destination,
                state=PayoutState.PENDING.value,
                idempotency_key=key,
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
                        earnings, EXTERNAL, amount, TransferKind.PAYOUT,
                        scoped_key("payout", row.id), reference=destination, id=row.transfer_id,
                    )
                ],
            )  # fmt: skip
            return row, await balance_in(session, tenant_id)

        return await self.db.run(work)

    async def mark_payout_paid(self, payout_id: str) -> Payout:
        """The payment processor confirmed the payout. Idempotent."""

        async def work(session: AsyncSession) -> Payout:
            repo = LedgerRepository(session)
            row = await repo.payout(payout_id, lock=True)
            if row is None:
                raise NotFound(f"payout_id: no payout {payout_id!r}")
            if row.state == PayoutState.PAID.value:
                return row
            if not await repo.move_payout(
                payout_id, [PayoutState.PENDING], state=PayoutState.PAID.value, updated_at=utcnow()
            ):
                raise FailedPrecondition(f"payout {payout_id} is {row.state}, not pending")
            return await self._payout(repo, payout_id)

        return await self.db.run(work)

    async def fail_payout(self, payout_id: str, reason: str) -> Payout:
        """The payment failed (or bounced): reversed by a PAYOUT_REVERSAL transfer
        (external → earnings), exactly once. Idempotent."""

        async def work(session: AsyncSession) -> Payout:
            repo = LedgerRepository(session)
            row = await repo.payout(payout_id, lock=True)
            if row is None:
                raise NotFound(f"payout_id: no payout {payout_id!r}")
            reversal = new_transfer_id()
            moved = await repo.move_payout(
                payout_id,
                [PayoutState.PENDING, PayoutState.PAID],
                state=PayoutState.REVERSED.value,
                reversal_transfer_id=reversal,
                reason=reason[:500],
                updated_at=utcnow(),
            )
            if not moved:
                return row  # already reversed
            earnings = account_id(row.tenant_id, AccountKind.EARNINGS)
            await post(
                session,
                [
                    NewTransfer(
                        EXTERNAL, earnings, row.amount, TransferKind.PAYOUT_REVERSAL,
                        scoped_key("payout", row.id, "reversal"), reference=reason[:500],
                        id=reversal,
                    )
                ],
            )  # fmt: skip
            return await self._payout(repo, payout_id)

        return await self.db.run(work)

    @staticmethod
    async def _payout(repo: LedgerRepository, payout_id: str) -> Payout:
        row = await repo.payout(payout_id)
        assert row is not None
        return row

    async def get_payout(self, payout_id: str) -> Payout:
        async with self.db.read() as session:
            row = await LedgerRepository(session).payout(payout_id)
        if row is None:
            raise NotFound(f"payout_id: no payout {payout_id!r}")
        return row

    # Holds without a job (tests, tools, benchmarks); jobs use ledger.holds in their own
    # transactions ---------------------------------------------------------------------------

    async def place_hold(
        self,
        tenant_id: str,
        amount: int,
        key: str,
        expires_at: datetime,
        job_id: str | None = None,
    ) -> Hold:
        async def work(session: AsyncSession) -> Hold:
            return await holds.place_hold(
                session,
                tenant_id=tenant_id,
                amount=amount,
                key=scoped_key("hold", key),
                expires_at=expires_at,
                job_id=job_id,
            )

        return await self.db.run(work)

    async def charge_hold(self, hold_id: str, cost: AttemptCost) -> Charged:
        """A metering tick: the attempt has cost `cost.cost` so far in total."""

        async def work(session: AsyncSession) -> Charged:
            key = scoped_key("hold", hold_id, cost.attempt, "meter", cost.cost)
            return await holds.charge(session, hold_id, cost, key)

        return await self.db.run(work)

    async def refund_attempt(self, hold_id: str, attempt: int) -> int:
        async def work(session: AsyncSession) -> int:
            key = scoped_key("hold", hold_id, attempt, "provider-fault")
            return await holds.refund_attempt(session, hold_id, attempt, key)

        return await self.db.run(work)

    async def settle_hold(
        self,
        hold_id: str,
        cost: AttemptCost | None,
        outcome: HoldState | None = None,
    ) -> Resolution:
        """Resolves the hold once: final charge of `cost` (if any), the rest released.
        Concurrent calls share transactions (group commit); a replay moves nothing."""
        attempt = cost.attempt if cost is not None else 0
        return await self.settlements(
            Settle(
                hold_id,
                cost,
                key=scoped_key("hold", hold_id, attempt, "final"),
                release_key=scoped_key("hold", hold_id, "release"),
                outcome=outcome,
            )
        )

    async def _settle_batch(self, requests: Sequence[Settle]) -> list[Resolution | Exception]:
        """One transaction for the batch; should it fail as a whole on a domain error (one
        request's), each request runs alone so only that one fails."""
        try:
            outcomes = await self._settle(requests)
        except DomainError:
            if len(requests) == 1:
                raise
            return [await self._settle_alone(r) for r in requests]
        pairs = zip(requests, outcomes, strict=True)
        return [outcome if outcome is not None else _no_hold(q) for q, outcome in pairs]

    async def _settle(self, requests: Sequence[Settle]) -> list[Resolution | None]:
        """settle_many in a transaction of its own, committed by its last statement; accounts
        seen for the first time (a new provider's earnings) are created, and it runs again."""
        try:
            return await self.db.run(
                lambda session: holds.settle_many(session, requests, commit=True)
            )
        except AccountsMissing as missing:
            accounts = missing.accounts
            await self.db.run(lambda session: ensure_accounts(LedgerRepository(session), accounts))
        return await self.db.run(lambda session: holds.settle_many(session, requests))

    async def _settle_alone(self, request: Settle) -> Resolution | Exception:
        try:
            (outcome,) = await self._settle([request])
        except DomainError as error:
            return error
        return outcome if outcome is not None else _no_hold(request)

    async def get_hold(self, hold_id: str) -> Hold:
        async with self.db.read() as session:
            row = await LedgerRepository(session).hold(hold_id)
        if row is None:
            raise NotFound(f"no hold {hold_id!r}")
        return row

    # Usage ---------------------------------------------------------------------------------

    async def usage(self, query: UsageQuery) -> UsageReport:
        async with self.db.read() as session:
            return await usage_report(LedgerRepository(session), query)
