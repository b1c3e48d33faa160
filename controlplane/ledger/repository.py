"""All SQL for ledger accounts, transfers, holds and payouts (usage reports: repository_usage)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.ledger import repository_pg
from controlplane.ledger.models import (
    PENDING_STATE,
    Account,
    Hold,
    Payout,
    PlatformFee,
    Transfer,
)
from controlplane.ledger.repository_pg import (
    HOLD_LOCK_COLUMNS,
    HOLD_WRITE_COLUMNS,
    TRANSFER_INPUT_COLUMNS,
    Posted,
)
from controlplane.ledger.states import HoldState, PayoutState
from controlplane.paging import Page, PageRequest, page_newest_first

ACCOUNTS = cast(Table, Account.__table__)
TRANSFERS = cast(Table, Transfer.__table__)
HOLDS = cast(Table, Hold.__table__)
PAYOUTS = cast(Table, Payout.__table__)
PENDING = HoldState.PENDING.value
# What a balance holds (SQLite INTEGER, PostgreSQL BIGINT); see transfers.INT64_MAX.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

LOCK_HOLDS = (
    select(*(HOLDS.c[c] for c in HOLD_LOCK_COLUMNS))
    .where(HOLDS.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(HOLDS.c.id)
    .with_for_update()
)
UPDATE_PENDING_HOLDS = (
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("b_id"), HOLDS.c.state == PENDING)
    .values({c: bindparam(c) for c, _ in HOLD_WRITE_COLUMNS[1:]})
)


class LedgerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    @property
    def postgres(self) -> bool:
        return self.session.get_bind().dialect.name == "postgresql"

    # Accounts ------------------------------------------------------------------------------

    async def ensure_account(
        self, account_id: str, tenant_id: str, kind: str, no_overdraft: bool
    ) -> None:
        """Creates the account unless it exists (safe under concurrent creators)."""
        insert_ = pg_insert if self.postgres else sqlite_insert
        statement = (
            insert_(Account)
            .values(
                id=account_id, tenant_id=tenant_id, kind=kind, balance=0, no_overdraft=no_overdraft
            )
            .on_conflict_do_nothing(index_elements=["id"])
        )
        await self.session.execute(statement)

    async def get_account(self, account_id: str) -> Account | None:
        return await self.session.get(Account, account_id, populate_existing=True)

    async def accounts_of(self, tenant_id: str) -> Sequence[Account]:
        query = (
            select(Account)
            .where(Account.tenant_id == tenant_id)
            .execution_options(populate_existing=True)
        )
        return (await self.session.scalars(query)).all()

    async def account_ids(self, tenant_id: str, kind: str) -> list[str]:
        """The ids of the tenant's accounts of one kind (several for a sharded account)."""
        query = select(ACCOUNTS.c.id).where(
            ACCOUNTS.c.tenant_id == tenant_id, ACCOUNTS.c.kind == kind
        )
        return sorted((await self.session.scalars(query)).all())

    async def lock_balances(self, account_ids: Sequence[str]) -> dict[str, int]:
        """Locks the accounts in account-id order (PostgreSQL); their balances."""
        query = (
            select(ACCOUNTS.c.id, ACCOUNTS.c.balance)
            .where(ACCOUNTS.c.id.in_(sorted(account_ids)))
            .order_by(ACCOUNTS.c.id)
            .with_for_update()
        )
        return {row.id: row.balance for row in await self.session.execute(query)}

    async def post(
        self,
        deltas: dict[str, int],
        transfers: Sequence[Sequence[Any]],
        holds: Sequence[Sequence[Any]],
        now: datetime,
        *,
        commit: bool = False,
    ) -> Posted:
        """All or nothing: adds each delta to its account, records `transfers` (rows in
        TRANSFER_INPUT_COLUMNS order) and writes `holds` back (rows in HOLD_WRITE_COLUMNS
        order, only those still pending), provided every account exists and none that
        forbids overdraft would end below zero; else changes nothing. On PostgreSQL the
        accounts are locked in account-id order first, so concurrent posts never deadlock,
        and with `commit` the transaction ends in the same round trip: committed if applied,
        else rolled back (the caller's transaction must have written nothing before); SQLite
        has one writer at a time, and its unit of work commits as usual."""
        if self.postgres:
            return await repository_pg.post(
                self.session, deltas, transfers, holds, now, commit=commit
            )
        found = {
            row.id: (row.balance + deltas[row.id], row.no_overdraft)
            for row in await self.session.execute(
                select(ACCOUNTS.c.id, ACCOUNTS.c.balance, ACCOUNTS.c.no_overdraft).where(
                    ACCOUNTS.c.id.in_(sorted(deltas))
                )
            )
        }
        refused = any((b < 0 and n) or not INT64_MIN <= b <= INT64_MAX for b, n in found.values())
        if len(found) != len(deltas) or refused:
            return Posted(False, 0, 0, found)
        if deltas:
            delta = case(
                {a: literal(d, BigInteger) for a, d in deltas.items()}, value=ACCOUNTS.c.id
            )
            await self.session.execute(
                update(ACCOUNTS)
                .values(balance=ACCOUNTS.c.balance + delta)
                .where(ACCOUNTS.c.id.in_(sorted(deltas)))
            )
        if transfers:
            await self.session.execute(
                insert(TRANSFERS), [self._transfer_row(t, found, deltas, now) for t in transfers]
            )
        written = 0
        if holds:
            names = [c for c, _ in HOLD_WRITE_COLUMNS]
            rows = [{"b_id": h[0], **dict(zip(names[1:], h[1:], strict=True))} for h in holds]
            result = await self.session.execute(UPDATE_PENDING_HOLDS, rows)
            written = int(getattr(result, "rowcount", 0))
        return Posted(True, written, len(transfers), found)

    @staticmethod
    def _transfer_row(
        row: Sequence[Any],
        after: dict[str, tuple[int, bool]],
        deltas: dict[str, int],
        now: datetime,
    ) -> dict[str, Any]:
        values = dict(zip((c for c, _ in TRANSFER_INPUT_COLUMNS), row, strict=True))
        debit, credit = values["debit_account_id"], values["credit_account_id"]
        values["debit_balance_after"] = after[debit][0] - deltas[debit] + values.pop("debit_offset")
        values["credit_balance_after"] = (
            after[credit][0] - deltas[credit] + values.pop("credit_offset")
        )
        values["created_at"] = now
        return values

    async def all_accounts(self) -> Sequence[Account]:
        query = select(Account).order_by(Account.id).execution_options(populate_existing=True)
        return (await self.session.scalars(query)).all()

    # Transfers -----------------------------------------------------------------------------

    async def transfer_by_key(self, key: str) -> Transfer | None:
        return await self.session.scalar(select(Transfer).where(Transfer.idempotency_key == key))

    async def transfers_by_key_prefix(self, prefix: str) -> Sequence[Transfer]:
        """Transfers whose key starts with `prefix` (which must end with a separator)."""
        query = (
            select(Transfer)
            .where(Transfer.idempotency_key.startswith(prefix, autoescape=True))
            .order_by(Transfer.idempotency_key)
        )
        return (await self.session.scalars(query)).all()

    async def job_flows(self, job_id: str) -> Sequence[tuple[str, str, str, int]]:
        """(kind, debit, credit, summed amount) of every transfer of a job."""
        query = (
            select(
                Transfer.kind,
                Transfer.debit_account_id,
                Transfer.credit_account_id,
                func.sum(Transfer.amount),
            )
            .where(Transfer.job_id == job_id)
            .group_by(Transfer.kind, Transfer.debit_account_id, Transfer.credit_account_id)
        )
        return [(k, d, c, int(s)) for k, d, c, s in await self.session.execute(query)]

    async def attempt_flows(self, job_id: str, attempt: int) -> Sequence[tuple[str, str, int]]:
        """(kind, credit account, summed amount) of one attempt's charges and fees."""
        query = (
            select(Transfer.kind, Transfer.credit_account_id, func.sum(Transfer.amount))
            .where(
                Transfer.job_id == job_id,
                Transfer.attempt == attempt,
                Transfer.kind.in_(("charge", "fee")),
            )
            .group_by(Transfer.kind, Transfer.credit_account_id)
        )
        return [(k, c, int(s)) for k, c, s in await self.session.execute(query)]

    async def entries(
        self,
        account_ids: Sequence[str],
        kinds: Sequence[str],
        job_id: str | None,
        start: datetime | None,
        end: datetime | None,
        page: PageRequest,
    ) -> Page[Transfer]:
        """One page of the transfers that move money in or out of `account_ids` (the only
        ones a tenant may read: those touching its own accounts), newest first."""
        query = select(Transfer).where(
            or_(
                Transfer.debit_account_id.in_(account_ids),
                Transfer.credit_account_id.in_(account_ids),
            )
        )
        if kinds:
            query = query.where(Transfer.kind.in_(kinds))
        if job_id:
            query = query.where(Transfer.job_id == job_id)
        if start:
            query = query.where(Transfer.created_at >= start)
        if end:
            query = query.where(Transfer.created_at < end)
        return await page_newest_first(
            self.session,
            query,
            (Transfer.created_at, Transfer.id),
            page,
            lambda t: (t.created_at, t.id),
        )

    async def recomputed_balances(self) -> dict[str, int]:
        """Every account's balance recomputed from the transfers alone."""
        credits = await self.session.execute(
            select(Transfer.credit_account_id, func.sum(Transfer.amount)).group_by(
                Transfer.credit_account_id
            )
        )
        debits = await self.session.execute(
            select(Transfer.debit_account_id, func.sum(Transfer.amount)).group_by(
                Transfer.debit_account_id
            )
        )
        totals: dict[str, int] = {}
        for account_id, amount in credits:
            totals[account_id] = totals.get(account_id, 0) + int(amount)
        for account_id, amount in debits:
            totals[account_id] = totals.get(account_id, 0) - int(amount)
        return totals

    async def transfer_count(self) -> int:
        return int(await self.session.scalar(select(func.count()).select_from(Transfer)) or 0)

    # Holds ---------------------------------------------------------------------------------

    async def insert_hold(self, hold: Hold) -> None:
        await self.session.execute(
            insert(HOLDS), [{c.name: getattr(hold, c.name) for c in HOLDS.columns}]
        )

    async def hold(self, hold_id: str, *, lock: bool = False) -> Hold | None:
        return await self._one_hold(Hold.id == hold_id, lock)

    async def hold_by_key(self, key: str) -> Hold | None:
        return await self._one_hold(Hold.key == key, False)

    async def hold_of_job(self, job_id: str, *, lock: bool = False) -> Hold | None:
        return await self._one_hold(Hold.job_id == job_id, lock)

    async def hold_ids_of_jobs(self, job_ids: Sequence[str]) -> dict[str, str]:
        """The ids of the jobs' holds, by job id (jobs without one are left out)."""
        rows = await self.session.execute(
            select(Hold.job_id, Hold.id).where(Hold.job_id.in_(job_ids))
        )
        return {job_id: hold_id for job_id, hold_id in rows if job_id is not None}

    async def _one_hold(self, where: Any, lock: bool) -> Hold | None:
        query = select(Hold).where(where).execution_options(populate_existing=True)
        if lock:
            query = query.with_for_update()
        return await self.session.scalar(query)

    async def lock_holds(self, hold_ids: Sequence[str]) -> list[tuple[Any, ...]]:
        """Locks the holds in id order (PostgreSQL); their rows, in HOLD_LOCK_COLUMNS order."""
        ids = sorted(set(hold_ids))
        if self.postgres:
            return await repository_pg.lock_holds(self.session, ids)
        return [tuple(row) for row in await self.session.execute(LOCK_HOLDS, {"ids": ids})]

    async def update_pending_hold(self, hold_id: str, guard: Any = None, **values: Any) -> bool:
        """Updates a hold's other columns (never its state: holds.post writes that, after
        states.set_hold_state) only while it is still pending (and `guard` holds), so a
        resolved hold never changes again. False when nothing matched."""
        statement = update(HOLDS).where(HOLDS.c.id == hold_id, HOLDS.c.state == PENDING)
        if guard is not None:
            statement = statement.where(guard)
        result = await self.session.execute(statement.values(**values))
        return bool(getattr(result, "rowcount", 0))

    async def due_holds(self, now: datetime, limit: int) -> Sequence[tuple[str, str | None]]:
        """(hold id, job id) of pending holds past their expiry, oldest first."""
        query = (
            select(Hold.id, Hold.job_id)
            .where(Hold.state == PENDING_STATE, Hold.expires_at < now)
            .order_by(Hold.expires_at)
            .limit(limit)
        )
        return [(h, j) for h, j in await self.session.execute(query)]

    async def unsettled_share(self, provider_tenant_id: str) -> int:
        """The provider's share of charges on pending holds: refundable on a provider fault,
        so not yet payable."""
        query = select(func.sum(Hold.attempt_charged - Hold.attempt_fee)).where(
            Hold.provider_tenant_id == provider_tenant_id, Hold.state == PENDING_STATE
        )
        return int(await self.session.scalar(query) or 0)

    async def holds_by_state(self) -> dict[str, int]:
        query = select(Hold.state, func.count()).group_by(Hold.state)
        return {s: int(n) for s, n in await self.session.execute(query)}

    # Payouts -------------------------------------------------------------------------------

    async def insert_payout(self, payout: Payout) -> None:
        await self.session.execute(
            insert(PAYOUTS), [{c.name: getattr(payout, c.name) for c in PAYOUTS.columns}]
        )

    async def payout(self, payout_id: str, *, lock: bool = False) -> Payout | None:
        query = (
            select(Payout).where(Payout.id == payout_id).execution_options(populate_existing=True)
        )
        if lock:
            query = query.with_for_update()
        return await self.session.scalar(query)

    async def payout_by_key(self, caller_tenant: str, key: str) -> Payout | None:
        """The payout asked for with `key` by a caller of `caller_tenant`."""
        query = (
            select(Payout)
            .where(Payout.idempotency_tenant_id == caller_tenant, Payout.idempotency_key == key)
            .execution_options(populate_existing=True)
        )
        return await self.session.scalar(query)

    async def payouts(
        self, tenant_id: str | None, states: Sequence[str], page: PageRequest
    ) -> Page[Payout]:
        """One page of payouts, newest first: one tenant's (None: every tenant's)."""
        query = select(Payout)
        if tenant_id is not None:
            query = query.where(Payout.tenant_id == tenant_id)
        if states:
            query = query.where(Payout.state.in_(states))
        return await page_newest_first(
            self.session,
            query,
            (Payout.created_at, Payout.id),
            page,
            lambda p: (p.created_at, p.id),
        )

    async def move_payout(
        self, payout_id: str, sources: Sequence[PayoutState], **values: Any
    ) -> bool:
        """Moves a payout out of one of `sources` (a guarded UPDATE, for
        states.set_payout_state, the only caller, once it has checked the edge); False when
        it was in none of them."""
        result = await self.session.execute(
            update(PAYOUTS)
            .where(PAYOUTS.c.id == payout_id, PAYOUTS.c.state.in_([s.value for s in sources]))
            .values(**values)
        )
        return bool(getattr(result, "rowcount", 0))

    # The platform fee --------------------------------------------------------------------

    async def platform_fee(self) -> int | None:
        row = await self.session.get(PlatformFee, 1, populate_existing=True)
        return None if row is None else row.fee_basis_points

    async def set_platform_fee(self, fee_basis_points: int, now: datetime) -> None:
        insert_ = pg_insert if self.postgres else sqlite_insert
        values = {"fee_basis_points": fee_basis_points, "updated_at": now}
        await self.session.execute(
            insert_(PlatformFee)
            .values(id=1, **values)
            .on_conflict_do_update(index_elements=["id"], set_=values)
        )
