"""All SQL for ledger accounts, transfers, holds, payouts and usage reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Row,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.jobs.models import Job, JobAttempt
from controlplane.ledger.models import Account, Hold, HoldState, Payout, PayoutState, Transfer
from controlplane.registry.models import Gpu, Host

ACCOUNTS = cast(Table, Account.__table__)
TRANSFERS = cast(Table, Transfer.__table__)
HOLDS = cast(Table, Hold.__table__)
PAYOUTS = cast(Table, Payout.__table__)
PENDING = HoldState.PENDING.value

# The columns a hold's money operations change; every update sets all of them.
HOLD_MONEY_COLUMNS = (
    "posted_amount",
    "state",
    "attempt",
    "provider_tenant_id",
    "attempt_charged",
    "attempt_fee",
    "release_transfer_id",
    "updated_at",
    "resolved_at",
)
HOLD_MONEY_TYPES = (
    "bigint", "varchar", "integer", "varchar", "bigint", "bigint", "varchar", "timestamptz",
    "timestamptz",
)  # fmt: skip
TRANSFER_COLUMNS = (
    ("id", "varchar"),
    ("debit_account_id", "varchar"),
    ("credit_account_id", "varchar"),
    ("amount", "bigint"),
    ("kind", "varchar"),
    ("idempotency_key", "varchar"),
    ("job_id", "varchar"),
    ("attempt", "integer"),
    ("reference", "varchar"),
    ("debit_balance_after", "bigint"),
    ("credit_balance_after", "bigint"),
    ("created_at", "timestamptz"),
)


def _recordset(columns: Sequence[tuple[str, str]]) -> str:
    """`jsonb_to_recordset(:rows) AS r(col type, …)`: a batch of rows as one JSON parameter,
    so each statement below has one text whatever the batch size (psycopg prepares it)."""
    return "jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(" + ", ".join(
        f"{c} {t}" for c, t in columns
    ) + ")"  # fmt: skip


# PostgreSQL: lock the accounts in account-id order, then add each delta.
PG_APPLY_DELTAS = text(
    f"""
    WITH d AS (SELECT * FROM {_recordset((("id", "varchar"), ("delta", "bigint")))}),
    locked AS (
        SELECT id FROM accounts WHERE id IN (SELECT id FROM d) ORDER BY id FOR UPDATE
    )
    UPDATE accounts AS a SET balance = a.balance + d.delta
    FROM d WHERE a.id = d.id AND a.id IN (SELECT id FROM locked)
    RETURNING a.id, a.balance, a.no_overdraft
    """
)
PG_UPDATE_PENDING_HOLDS = text(
    "UPDATE holds AS h SET "
    + ", ".join(f"{c} = r.{c}" for c in HOLD_MONEY_COLUMNS)
    + " FROM "
    + _recordset((("b_id", "varchar"), *zip(HOLD_MONEY_COLUMNS, HOLD_MONEY_TYPES, strict=True)))
    + " WHERE h.id = r.b_id AND h.state = 'pending'"
)
PG_INSERT_TRANSFERS = text(
    f"INSERT INTO transfers ({', '.join(c for c, _ in TRANSFER_COLUMNS)}) "
    f"SELECT {', '.join(c for c, _ in TRANSFER_COLUMNS)} FROM {_recordset(TRANSFER_COLUMNS)}"
)
PG_LOCK_HOLDS = text(
    f"""
    SELECT id, tenant_id, job_id, amount, expires_at, {", ".join(HOLD_MONEY_COLUMNS)}
    FROM holds WHERE id IN (SELECT jsonb_array_elements_text(CAST(:ids AS jsonb)))
    ORDER BY id FOR UPDATE
    """
)


def _json(value: Any) -> str:
    return json.dumps(value, default=_iso, separators=(",", ":"))


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


UPDATE_PENDING_HOLDS = (
    update(HOLDS)
    .where(HOLDS.c.id == bindparam("b_id"), HOLDS.c.state == PENDING)
    .values({c: bindparam(c) for c in HOLD_MONEY_COLUMNS})
)
LOCK_HOLDS = (
    select(*(HOLDS.c[c] for c in ("id", "tenant_id", "job_id", "amount", "expires_at")),
           *(HOLDS.c[c] for c in HOLD_MONEY_COLUMNS))
    .where(HOLDS.c.id.in_(bindparam("ids", expanding=True)))
    .order_by(HOLDS.c.id)
    .with_for_update()
)  # fmt: skip


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

    async def lock_balances(self, account_ids: Sequence[str]) -> dict[str, int]:
        """Locks the accounts in account-id order (PostgreSQL); their balances."""
        query = (
            select(ACCOUNTS.c.id, ACCOUNTS.c.balance)
            .where(ACCOUNTS.c.id.in_(sorted(account_ids)))
            .order_by(ACCOUNTS.c.id)
            .with_for_update()
        )
        return {row.id: row.balance for row in await self.session.execute(query)}

    async def apply_deltas(self, deltas: dict[str, int]) -> dict[str, tuple[int, bool]]:
        """Adds each delta to its account in one statement; {account: (new balance,
        no_overdraft)} for the accounts that exist. On PostgreSQL the rows are locked first in
        account-id order (a locking CTE), so two such statements can never deadlock; SQLite
        has one writer at a time."""
        ids = sorted(deltas)
        if self.postgres:
            rows = [{"id": a, "delta": deltas[a]} for a in ids]
            result = await self.session.execute(PG_APPLY_DELTAS, {"rows": _json(rows)})
        else:
            delta = case(
                {a: literal(d, BigInteger) for a, d in deltas.items()}, value=ACCOUNTS.c.id
            )
            result = await self.session.execute(
                update(ACCOUNTS)
                .values(balance=ACCOUNTS.c.balance + delta)
                .where(ACCOUNTS.c.id.in_(ids))
                .returning(ACCOUNTS.c.id, ACCOUNTS.c.balance, ACCOUNTS.c.no_overdraft)
            )
        return {row.id: (row.balance, row.no_overdraft) for row in result}

    async def all_accounts(self) -> Sequence[Account]:
        query = select(Account).order_by(Account.id).execution_options(populate_existing=True)
        return (await self.session.scalars(query)).all()

    # Transfers -----------------------------------------------------------------------------

    async def insert_transfers(self, rows: Sequence[dict[str, Any]]) -> None:
        """Inserts transfer rows (column → value) in one statement."""
        if self.postgres:
            await self.session.execute(PG_INSERT_TRANSFERS, {"rows": _json(rows)})
        else:
            await self.session.execute(insert(TRANSFERS), list(rows))

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
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> Sequence[Transfer]:
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
        if before:
            query = query.where(
                or_(
                    Transfer.created_at < before[0],
                    (Transfer.created_at == before[0]) & (Transfer.id < before[1]),
                )
            )
        query = query.order_by(Transfer.created_at.desc(), Transfer.id.desc()).limit(limit)
        return (await self.session.scalars(query)).all()

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

    async def _one_hold(self, where: Any, lock: bool) -> Hold | None:
        query = select(Hold).where(where).execution_options(populate_existing=True)
        if lock:
            query = query.with_for_update()
        return await self.session.scalar(query)

    async def lock_holds(self, hold_ids: Sequence[str]) -> dict[str, Row[Any]]:
        """Locks the holds in id order (PostgreSQL); their money columns, by id."""
        ids = sorted(set(hold_ids))
        if self.postgres:
            rows = await self.session.execute(PG_LOCK_HOLDS, {"ids": _json(ids)})
        else:
            rows = await self.session.execute(LOCK_HOLDS, {"ids": ids})
        return {row.id: row for row in rows}

    async def update_pending_holds(self, values: Sequence[dict[str, Any]]) -> int:
        """Sets HOLD_MONEY_COLUMNS of each hold (`b_id`) that is still pending; how many."""
        if self.postgres:
            result = await self.session.execute(PG_UPDATE_PENDING_HOLDS, {"rows": _json(values)})
        else:
            result = await self.session.execute(UPDATE_PENDING_HOLDS, list(values))
        return int(getattr(result, "rowcount", 0))

    async def update_pending_hold(self, hold_id: str, guard: Any = None, **values: Any) -> bool:
        """Updates a hold only while it is still pending (and `guard` holds): the one place
        a hold changes, so a resolved hold never changes again. False when nothing matched."""
        statement = update(HOLDS).where(HOLDS.c.id == hold_id, HOLDS.c.state == PENDING)
        if guard is not None:
            statement = statement.where(guard)
        result = await self.session.execute(statement.values(**values))
        return bool(getattr(result, "rowcount", 0))

    async def due_holds(self, now: datetime, limit: int) -> Sequence[tuple[str, str | None]]:
        """(hold id, job id) of pending holds past their expiry, oldest first."""
        query = (
            select(Hold.id, Hold.job_id)
            .where(Hold.state == PENDING, Hold.expires_at < now)
            .order_by(Hold.expires_at)
            .limit(limit)
        )
        return [(h, j) for h, j in await self.session.execute(query)]

    async def unsettled_share(self, provider_tenant_id: str) -> int:
        """The provider's share of charges on pending holds: refundable on a provider fault,
        so not yet payable."""
        query = select(func.sum(Hold.attempt_charged - Hold.attempt_fee)).where(
            Hold.provider_tenant_id == provider_tenant_id, Hold.state == PENDING
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

    async def payout_by_key(self, tenant_id: str, key: str) -> Payout | None:
        query = (
            select(Payout)
            .where(Payout.tenant_id == tenant_id, Payout.idempotency_key == key)
            .execution_options(populate_existing=True)
        )
        return await self.session.scalar(query)

    async def move_payout(
        self, payout_id: str, sources: Sequence[PayoutState], **values: Any
    ) -> bool:
        """Moves a payout out of one of `sources`; False when it was in none of them."""
        result = await self.session.execute(
            update(PAYOUTS)
            .where(PAYOUTS.c.id == payout_id, PAYOUTS.c.state.in_([s.value for s in sources]))
            .values(**values)
        )
        return bool(getattr(result, "rowcount", 0))

    # Usage ---------------------------------------------------------------------------------

    async def usage_attempts(
        self,
        tenant_id: str | None,
        provider_tenant_id: str | None,
        job_id: str | None,
        start: datetime | None,
        end: datetime | None,
        limit: int,
    ) -> Sequence[Any]:
        """Per attempt of the matching started jobs: job id, started_at, attempt, host,
        GPU uuids, run time and whether it was lost; newest job first."""
        query = (
            select(
                Job.id.label("job_id"),
                Job.started_at,
                JobAttempt.attempt,
                JobAttempt.host_id,
                JobAttempt.gpu_uuids,
                JobAttempt.run_time_ms,
                JobAttempt.lost,
            )
            .join(JobAttempt, JobAttempt.job_id == Job.id)
            .where(Job.started_at.is_not(None))
        )
        if tenant_id is not None:
            query = query.where(Job.tenant_id == tenant_id)
        if provider_tenant_id is not None:
            ran_there = (
                select(JobAttempt.job_id)
                .join(Host, Host.id == JobAttempt.host_id)
                .where(Host.provider_tenant_id == provider_tenant_id)
            )
            query = query.where(Job.id.in_(ran_there))
        if job_id:
            query = query.where(Job.id == job_id)
        if start:
            query = query.where(Job.started_at >= start)
        if end:
            query = query.where(Job.started_at < end)
        query = query.order_by(Job.started_at.desc(), Job.id.desc(), JobAttempt.attempt).limit(
            limit
        )
        return (await self.session.execute(query)).all()

    async def net_charges(self, job_ids: Sequence[str]) -> dict[str, int]:
        """Per job: charges and fees minus refunds (what the consumer paid, net)."""
        signed = case(
            (Transfer.kind.in_(("charge", "fee")), Transfer.amount),
            (Transfer.kind == "refund", -Transfer.amount),
            else_=0,
        )
        totals: dict[str, int] = {}
        ids = list(job_ids)
        for i in range(0, len(ids), 500):
            query = (
                select(Transfer.job_id, func.sum(signed))
                .where(Transfer.job_id.in_(ids[i : i + 500]))
                .group_by(Transfer.job_id)
            )
            totals.update({j: int(s or 0) for j, s in await self.session.execute(query)})
        return totals

    async def gpu_names(self, uuids: Sequence[str]) -> dict[str, str]:
        if not uuids:
            return {}
        query = select(Gpu.uuid, Gpu.name).where(Gpu.uuid.in_(sorted(set(uuids))))
        return {u: n for u, n in await self.session.execute(query)}
