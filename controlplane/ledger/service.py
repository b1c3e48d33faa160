"""The one way into the ledger: deposits, balances, statements, refunds, payouts, the
consistency check, usage reports, and holds, whose methods work inside the caller's
transaction (a job's, or one opened for the call); group commit is an explicit option."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.repository import AuthRepository
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import DomainError, InvalidArgument, NotFound
from controlplane.ledger import external, holds, limits, payouts, refunds
from controlplane.ledger.balances import Balance, balance_in
from controlplane.ledger.batch import GroupCommit
from controlplane.ledger.fees import PlatformFees
from controlplane.ledger.holds import AttemptCost, Charged, Resolution, Settle
from controlplane.ledger.limits import Budget, SpendingLimitExceeded
from controlplane.ledger.limits_repository import SpendingRepository
from controlplane.ledger.models import Account, Hold, Payout, Transfer
from controlplane.ledger.refunds import Refund
from controlplane.ledger.repository import LedgerRepository
from controlplane.ledger.repository_usage import UsageRepository
from controlplane.ledger.statements import Entry, legs, statement_accounts
from controlplane.ledger.states import HoldState, PayoutState
from controlplane.ledger.transfers import (
    EXTERNAL,
    MAX_AMOUNT,
    MICRO,
    MS_PER_HOUR,
    PLATFORM,
    REVENUE,
    AccountKind,
    AccountsMissing,
    TransferKind,
    account_id,
    charge_for,
    ensure_accounts,
    ensure_tenant_accounts,
    format_credits,
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
    "Budget",
    "CheckReport",
    "Entry",
    "LedgerService",
    "Refund",
    "SpendingLimitExceeded",
    "TransferKind",
    "account_id",
    "balance_in",
    "charge_for",
    "ensure_tenant_accounts",
    "format_credits",
    "split_fee",
    "transfer",
]


@dataclass(frozen=True, slots=True)
class CheckReport:
    consistent: bool
    account_count: int
    transfer_count: int
    balance_sum: int
    # (account, kind, tenant, stored, recomputed)
    mismatches: list[tuple[str, str, str, int, int]]


def _no_hold(request: Settle) -> NotFound:
    return NotFound(f"no hold {request.hold_id!r}")


class LedgerService:
    """The ledger, for the API, jobs, tools, tests and benchmarks alike. Its hold methods
    take the caller's session (a job places, charges and settles its hold inside the job's
    own transaction); those for callers without one open a transaction and call them."""

    def __init__(self, db: Database, *, min_payout: int = MICRO, max_batch: int = 128) -> None:
        self.db = db
        self.min_payout = min_payout
        # The platform fee an operator set at run time (None: the caller's settings).
        self.fees = PlatformFees(db)
        # The group commit of settle_hold(group_commit=True): concurrent settlements of
        # callers without a transaction share one per batch (settle_many, committing).
        self.settlements = GroupCommit(self._settle_batch, max_batch=max_batch)

    # Deposits, balances, statements, check ------------------------------------------------

    async def deposit(
        self, tenant_id: str, amount: int, reference: str, key: str, *, caller: str = PLATFORM
    ) -> tuple[Transfer, Balance]:
        """Credits `amount` from outside (external → available); idempotent by `key`, which
        is the `caller` tenant's (an admin's; tools act as the platform). A deposit that would
        take the balance past what it can hold is FailedPrecondition."""
        if amount <= 0 or amount > MAX_AMOUNT:
            raise InvalidArgument("amount_micro_credits", f"must be between 1 and {MAX_AMOUNT}")

        async def work(session: AsyncSession) -> tuple[Transfer, Balance]:
            await ensure_tenant_accounts(session, tenant_id)
            repo, scoped = LedgerRepository(session), scoped_key("deposit", caller, key)
            credit = account_id(tenant_id, AccountKind.AVAILABLE)
            replay = await repo.transfer_by_key(scoped)
            debit = replay.debit_account_id if replay else await external.shard_to_debit(
                repo, await external.lock_shards(repo, credit), amount
            )  # fmt: skip
            row = await transfer(
                session,
                debit=debit,
                credit=credit,
                amount=amount,
                kind=TransferKind.DEPOSIT,
                key=scoped,
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
    ) -> Page[Entry]:
        """A statement, newest first: each transfer touching the tenant's accounts of
        `account_kinds` (all of its own when empty) as one entry per leg on them, so each
        account's entries sum to its balance. A page holds `page.size` transfers, so up to
        twice as many entries (a hold: −X on available, +X on held)."""
        async with self.db.read() as session:
            repo = LedgerRepository(session)
            accounts = await repo.accounts_of(tenant_id)
            ids = statement_accounts(tenant_id, accounts, account_kinds)
            if not ids:
                return Page([])
            rows = await repo.entries(ids, [k.value for k in kinds], job_id, start, end, page)
        return Page(legs(rows.items, ids), rows.next_cursor)

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

    # Refunds and payouts (ledger/refunds.py, ledger/payouts.py) ---------------------------

    async def refund_job(
        self, job_id: str, amount: int, reason: str, key: str, *, caller: str = PLATFORM
    ) -> Refund:
        """Returns up to everything charged for a settled job, minus what was refunded
        already, to the consumer's available account: REFUND transfers from the provider's
        earnings and from platform revenue (the fee part), in proportion. `amount` 0 =
        everything left. Idempotent by `key`, the `caller` tenant's (an admin's)."""
        refunds.validate_refund(amount)
        return await self.db.run(
            lambda session: refunds.refund_job(session, job_id, amount, reason, key, caller)
        )

    async def payout(
        self,
        tenant_id: str,
        amount: int,
        destination: str,
        key: str,
        *,
        caller: str | None = None,
    ) -> tuple[Payout, Balance]:
        """Moves earnings out (earnings → external), recorded as a PENDING payout. Only
        earnings that no pending hold could still take back are payable. Idempotent by
        `key`, the `caller` tenant's (None: the tenant's own): a replay returns the payout as
        it is now."""
        payouts.validate_payout(amount, destination, self.min_payout)
        owner = caller or tenant_id
        return await self.db.run(
            lambda session: payouts.pay_out(session, tenant_id, amount, destination, key, owner)
        )

    async def list_payouts(
        self, tenant_id: str | None, states: Sequence[PayoutState], page: PageRequest
    ) -> Page[Payout]:
        """Payouts newest first: one tenant's, or (None) every tenant's."""
        async with self.db.read() as session:
            return await LedgerRepository(session).payouts(
                tenant_id, [s.value for s in states], page
            )

    async def mark_payout_paid(self, payout_id: str) -> Payout:
        """The payment processor confirmed the payout. Idempotent."""
        return await self.db.run(lambda session: payouts.mark_paid(session, payout_id))

    async def fail_payout(self, payout_id: str, reason: str) -> tuple[Payout, Balance]:
        """The payment failed (or bounced): reversed by a PAYOUT_REVERSAL transfer
        (external → earnings), exactly once. Idempotent."""

        async def work(session: AsyncSession) -> tuple[Payout, Balance]:
            row = await payouts.reverse(session, payout_id, reason)
            return row, await balance_in(session, row.tenant_id)

        return await self.db.run(work)

    async def get_payout(self, payout_id: str) -> Payout:
        async with self.db.read() as session:
            row = await LedgerRepository(session).payout(payout_id)
        if row is None:
            raise NotFound(f"payout_id: no payout {payout_id!r}")
        return row

    # Monthly spending limits (ledger/limits.py) --------------------------------------------

    async def set_spending_limit(
        self, tenant_id: str, monthly_limit: int, alert_percents: Sequence[int]
    ) -> Budget:
        """Sets the tenant's monthly limit (0 removes it) and its alert thresholds. The
        budget after (thresholds already reached are recorded by the next check)."""
        limits.validate_limit(monthly_limit, alert_percents)

        return await self.db.run(
            lambda session: limits.set_limit(
                session, tenant_id, monthly_limit, alert_percents, utcnow()
            )
        )

    async def budget(self, tenant_id: str) -> Budget:
        """The tenant's month: limit, spent, committed, remaining and the alerts recorded."""
        async with self.db.read() as session:
            return await limits.budget_in(session, tenant_id, utcnow())

    async def require_tenant(self, tenant_id: str) -> None:
        """NotFound naming tenant_id unless the tenant exists (the ledger itself keeps
        accounts of any id: callers that take a tenant from a request check it here)."""
        async with self.db.read() as session:
            if await AuthRepository(session).get_tenant(tenant_id) is None:
                raise NotFound(f"tenant_id: no tenant {tenant_id!r}")

    async def limited_tenants(self) -> list[str]:
        """Every tenant with a spending limit."""
        async with self.db.read() as session:
            return [row.tenant_id for row in await SpendingRepository(session).limits()]

    async def budget_in(self, session: AsyncSession, tenant_id: str, now: datetime) -> Budget:
        """budget(), inside the caller's transaction."""
        return await limits.budget_in(session, tenant_id, now)

    async def record_alerts(
        self, session: AsyncSession, budget: Budget, usage: int, now: datetime
    ) -> list[int]:
        """Records the thresholds `usage` has reached this month that are not recorded yet,
        once each (safe under concurrent callers); the percents this call recorded."""
        return await limits.record_alerts(session, budget, usage, now)

    # Holds, inside the caller's transaction (a job's, or one opened below) ---------------

    async def place_hold(
        self,
        session: AsyncSession,
        *,
        tenant_id: str,
        amount: int,
        key: str,
        expires_at: datetime,
        job_id: str | None = None,
        fresh_key: bool = False,
    ) -> Hold:
        """Holds `amount` of the tenant's available credit (a pending hold). Idempotent by
        `key` (not looked up when `fresh_key`: holds.place_hold); insufficient credit is
        FailedPrecondition."""
        return await holds.place_hold(
            session,
            tenant_id=tenant_id,
            amount=amount,
            key=key,
            expires_at=expires_at,
            job_id=job_id,
            fresh_key=fresh_key,
        )

    async def charge(
        self, session: AsyncSession, hold_id: str, cost: AttemptCost, key: str
    ) -> Charged:
        """Metering: charges the increment that brings the attempt's total to `cost.cost`,
        capped at what the hold has left; a replay (same or lower total) charges nothing."""
        return await holds.charge(session, hold_id, cost, key)

    async def refund_attempt(
        self, session: AsyncSession, hold_id: str, attempt: int, key: str
    ) -> int:
        """A provider fault: what `attempt` was charged goes back into the pending hold."""
        return await holds.refund_attempt(session, hold_id, attempt, key)

    async def settle(
        self,
        session: AsyncSession,
        hold_id: str,
        *,
        cost: AttemptCost | None,
        key: str,
        release_key: str,
        outcome: HoldState | None = None,
    ) -> Resolution:
        """Resolves one pending hold exactly once: the final charge of `cost` (if any), the
        rest released. A replay (the hold resolved already) moves nothing."""
        return await holds.settle(
            session, hold_id, cost=cost, key=key, release_key=release_key, outcome=outcome
        )

    async def settle_many(
        self, session: AsyncSession, requests: Sequence[Settle], *, commit: bool = False
    ) -> list[Resolution | None]:
        """Resolves many holds in one statement (see holds.settle_many); `commit`: the
        settlement is the transaction's only work and its last statement commits it."""
        return await holds.settle_many(session, requests, commit=commit)

    async def extend(self, session: AsyncSession, hold_id: str, expires_at: datetime) -> bool:
        """Moves a pending hold's expiry (a requeued job waits again)."""
        return await holds.extend(session, hold_id, expires_at)

    async def top_up(
        self, session: AsyncSession, hold_id: str, amount: int, key: str, expires_at: datetime
    ) -> int:
        """Adds `amount` to a pending hold and moves its expiry (see holds.top_up)."""
        return await holds.top_up(session, hold_id, amount, key, expires_at)

    # Holds in a transaction of their own (callers without a job: tools, tests, the
    # benchmark), through the methods above; keys derived from the hold -------------------

    async def hold_credit(
        self,
        tenant_id: str,
        amount: int,
        key: str,
        expires_at: datetime,
        job_id: str | None = None,
    ) -> Hold:
        """place_hold in a transaction of its own, its key scoped as "hold/<key>"."""
        return await self.db.run(
            lambda session: self.place_hold(
                session,
                tenant_id=tenant_id,
                amount=amount,
                key=scoped_key("hold", key),
                expires_at=expires_at,
                job_id=job_id,
            )
        )

    async def charge_hold(self, hold_id: str, cost: AttemptCost) -> Charged:
        """A metering tick: the attempt has cost `cost.cost` so far in total."""
        key = scoped_key("hold", hold_id, cost.attempt, "meter", cost.cost)
        return await self.db.run(lambda session: self.charge(session, hold_id, cost, key))

    async def refund_hold_attempt(self, hold_id: str, attempt: int) -> int:
        """refund_attempt (a provider fault) in a transaction of its own."""
        key = scoped_key("hold", hold_id, attempt, "provider-fault")
        return await self.db.run(
            lambda session: self.refund_attempt(session, hold_id, attempt, key)
        )

    async def settle_hold(
        self,
        hold_id: str,
        cost: AttemptCost | None,
        outcome: HoldState | None = None,
        *,
        group_commit: bool,
    ) -> Resolution:
        """Resolves the hold once: final charge of `cost` (if any), the rest released; a
        replay moves nothing. `group_commit`: concurrent calls share transactions, each
        batch one settle_many whose post commits it; else one transaction of its own."""
        attempt = cost.attempt if cost is not None else 0
        key = scoped_key("hold", hold_id, attempt, "final")
        release_key = scoped_key("hold", hold_id, "release")
        if group_commit:
            return await self.settlements(Settle(hold_id, cost, key, release_key, outcome))
        return await self.db.run(
            lambda session: self.settle(
                session, hold_id, cost=cost, key=key, release_key=release_key, outcome=outcome
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
                lambda session: self.settle_many(session, requests, commit=True)
            )
        except AccountsMissing as missing:
            accounts = missing.accounts
            await self.db.run(lambda session: ensure_accounts(LedgerRepository(session), accounts))
        return await self.db.run(lambda session: self.settle_many(session, requests))

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
            return await usage_report(UsageRepository(session), query)
