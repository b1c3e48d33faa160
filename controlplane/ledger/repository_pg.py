"""The ledger's PostgreSQL hot path: locking holds (one statement), then locking accounts and
posting a batch (two statements, one round trip, with the COMMIT when the caller asks)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.ledger.states import HoldState

PENDING = HoldState.PENDING.value
# Column order of a locked hold row (both backends).
HOLD_LOCK_COLUMNS = (
    "id",
    "tenant_id",
    "job_id",
    "amount",
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
# (column, type) of the hold rows `post` writes: the id, then every money column.
HOLD_WRITE_COLUMNS = (
    ("id", "varchar"),
    ("posted_amount", "bigint"),
    ("state", "varchar"),
    ("attempt", "integer"),
    ("provider_tenant_id", "varchar"),
    ("attempt_charged", "bigint"),
    ("attempt_fee", "bigint"),
    ("release_transfer_id", "varchar"),
    ("updated_at", "timestamptz"),
    ("resolved_at", "timestamptz"),
)
# (column, type) of the transfer rows `post` takes: each balance_after is given as the
# account's running change within the batch (offset), added to its balance before the batch.
TRANSFER_INPUT_COLUMNS = (
    ("id", "varchar"),
    ("debit_account_id", "varchar"),
    ("credit_account_id", "varchar"),
    ("amount", "bigint"),
    ("kind", "varchar"),
    ("idempotency_key", "varchar"),
    ("job_id", "varchar"),
    ("attempt", "integer"),
    ("reference", "varchar"),
    ("debit_offset", "bigint"),
    ("credit_offset", "bigint"),
)


@dataclass(frozen=True, slots=True)
class Posted:
    """What a post did: `ok` (all applied) or nothing; with the balances the deltas leave (or
    would leave) in every account that exists."""

    ok: bool
    holds_written: int
    transfers_recorded: int
    balances: dict[str, tuple[int, bool]]


def _unnest(alias: str, columns: Sequence[tuple[str, str]]) -> str:
    """`unnest(%(alias_col)s::type[], …) AS alias(col, …)`: a batch as one array per column,
    so the statement text is the same whatever the batch size."""
    arrays = ", ".join(f"%({alias}_{c})s::{t}[]" for c, t in columns)
    return f"unnest({arrays}) AS {alias}({', '.join(c for c, _ in columns)})"


def array_literal(values: Sequence[Any], sql_type: str = "varchar") -> str:
    """PostgreSQL's text form of an array of `values` (None is NULL): one text parameter per
    column, at a fraction of what psycopg's element-by-element array dumpers cost a batch.

    JSON's text of a list without a backslash in it is PostgreSQL's array text once its
    brackets become braces: strings double-quoted with nothing escaped, numbers bare, and
    null, which PostgreSQL reads as NULL. A backslash means JSON escaped something (a quote,
    a backslash or a control character, the last in a way PostgreSQL would misread): then
    each element is quoted the way PostgreSQL asks."""
    if sql_type == "timestamptz":
        values = [None if v is None else v.isoformat() for v in values]
    text = _json(values)
    if "\\" not in text:
        return "{" + text[1:-1] + "}"
    return "{" + ",".join(_quote(v) for v in values) + "}"


_json = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":")).encode


def _quote(value: object) -> str:
    if value is None:
        return "NULL"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _arrays(
    alias: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]
) -> dict[str, str]:
    """The parameters of `_unnest(alias, columns)` for `rows`: one array per column."""
    values = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    return {f"{alias}_{c}": array_literal(v, t) for (c, t), v in zip(columns, values, strict=True)}


# `id = ANY(array)`: each hold found through the primary key, whatever the batch size.
LOCK_HOLDS = (
    f"SELECT {', '.join(HOLD_LOCK_COLUMNS)} FROM holds "
    "WHERE id = ANY(%(ids)s::varchar[]) ORDER BY id FOR UPDATE"
)

# Every account a post touches is locked first, by a statement of its own whose plan cannot
# change the order: PostgreSQL sorts, then locks row by row in that order (LockRows above the
# Sort). So concurrent posts, and every other account locker (lock_balances), take accounts in
# one global order and never deadlock, whatever plan the statements that follow get.
# FOR NO KEY UPDATE is what the UPDATE takes anyway.
LOCK_ACCOUNTS = (
    "SELECT id FROM accounts WHERE id = ANY(%(accounts)s::varchar[]) ORDER BY id FOR NO KEY UPDATE"
)

# Then one statement posts the batch, on rows this transaction holds locked (so it waits for
# no lock, whatever its plan): it adds the deltas, writes the holds back where still pending
# and inserts the transfers, whose balances after come from each account's balance before
# the batch. Then it checks what it did: every account found, none that forbids overdraft
# below zero, every hold written and every transfer recorded. If not, ledger_refuse()
# (migration 0008) raises, which undoes the whole statement, with the balances the deltas
# would leave in every account that exists as its DETAIL, so the caller can create missing
# accounts and run it again, or refuse. Checking after the writes, not before, is a third
# cheaper than a statement that checks first: the accounts and holds are read once.
# Each hold's state change was checked against its machine in Python before this statement
# was built (states.set_hold_state, resolve_holds); here the guarded UPDATE writes it only
# where the row is still in the state it was locked in. That guard compares with a column of
# the batch (h.was), not a constant: with `state = 'pending'` a planner whose statistics
# undercount pending holds scans them all through the state index instead of looking each
# hold up by id.
_HOLD_SETS = ", ".join(f"{c} = h.{c}" for c, _ in HOLD_WRITE_COLUMNS[1:])
_TRANSFER_COLUMNS = ", ".join(c for c, _ in TRANSFER_INPUT_COLUMNS[:-2])
REFUSED = "GP001"  # ledger_refuse()'s SQLSTATE
POST = f"""
WITH d AS (SELECT * FROM unnest(%(accounts)s::varchar[], %(deltas)s::bigint[]) AS d(id, delta)),
moved AS (
    UPDATE accounts AS a SET balance = a.balance + d.delta FROM d WHERE a.id = d.id
    RETURNING a.id, a.balance, a.no_overdraft, a.balance - d.delta AS before
),
written AS (
    UPDATE holds SET {_HOLD_SETS}
    FROM {_unnest("h", (*HOLD_WRITE_COLUMNS, ("was", "varchar")))}
    WHERE holds.id = h.id AND holds.state = h.was
    RETURNING holds.id
),
recorded AS (
    INSERT INTO transfers ({_TRANSFER_COLUMNS}, debit_balance_after, credit_balance_after,
        created_at)
    SELECT {", ".join(f"t.{c}" for c, _ in TRANSFER_INPUT_COLUMNS[:-2])},
        dm.before + t.debit_offset, cm.before + t.credit_offset, %(now)s::timestamptz
    FROM {_unnest("t", TRANSFER_INPUT_COLUMNS)}
    JOIN moved dm ON dm.id = t.debit_account_id JOIN moved cm ON cm.id = t.credit_account_id
    RETURNING transfers.id
),
done AS (
    SELECT (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM written) AS written,
        (SELECT count(*) FROM recorded) AS recorded,
        (SELECT coalesce(bool_and(balance >= 0 OR NOT no_overdraft), true) FROM moved) AS funded
)
SELECT CASE
        WHEN done.moved = cardinality(%(accounts)s::varchar[]) AND done.funded
            AND done.written = cardinality(%(h_id)s::varchar[])
            AND done.recorded = cardinality(%(t_id)s::varchar[])
        THEN true
        ELSE ledger_refuse(json_build_object(
            'written', done.written, 'recorded', done.recorded,
            'balances', (SELECT json_agg(json_build_array(id, balance, no_overdraft)) FROM moved)
        )::text)
    END, done.written, done.recorded, m.id, m.balance, m.no_overdraft
FROM done LEFT JOIN moved m ON true
"""


async def _connection(session: AsyncSession) -> psycopg.AsyncConnection[Any]:
    """The psycopg connection of the session's transaction."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return cast(psycopg.AsyncConnection[Any], raw.driver_connection)


def _wrapped(query: str, params: dict[str, Any], error: psycopg.Error) -> StatementError:
    """A driver error as SQLAlchemy's, so the unit of work retries serialization failures and
    deadlocks as usual."""
    return DBAPIError.instance(query, params, error, psycopg.Error)


async def execute(session: AsyncSession, query: str, params: dict[str, Any]) -> list[Any]:
    """Runs `query` on the connection of the session's transaction and fetches its rows
    (tuples). Unprepared, so PostgreSQL plans it for this call's parameters and table sizes: a
    cached generic plan made while a table was small can stay a sequential scan as the table
    grows. Measured here, cached plans gained nothing (2,842 against 2,898 settlements/s) and
    two of three benchmark runs with them ran at half the rate. In a pipeline, so a
    transaction's first statement travels with its BEGIN: one round trip, not two."""
    driver = await _connection(session)
    try:
        async with driver.pipeline():
            cursor = await driver.execute(query, params, prepare=False, binary=True)
        return await cursor.fetchall()
    except psycopg.Error as error:
        raise _wrapped(query, params, error) from error


async def execute_all(
    session: AsyncSession, statements: Sequence[tuple[str, dict[str, Any]]]
) -> list[Any]:
    """Runs `statements` in order in one pipeline (one round trip), unprepared as `execute`
    does; the rows of the last one."""
    driver = await _connection(session)
    query, params = statements[-1]
    try:
        async with driver.pipeline():
            for query, params in statements[:-1]:
                await driver.execute(query, params, prepare=False)
            query, params = statements[-1]
            cursor = await driver.execute(query, params, prepare=False, binary=True)
        return await cursor.fetchall() if cursor.description else []
    except psycopg.Error as error:
        raise _wrapped(query, params, error) from error


async def lock_holds(session: AsyncSession, ids: Sequence[str]) -> list[Any]:
    """See LedgerRepository.lock_holds."""
    return await execute(session, LOCK_HOLDS, {"ids": array_literal(ids)})


async def post(
    session: AsyncSession,
    deltas: dict[str, int],
    transfers: Sequence[Sequence[Any]],
    holds: Sequence[Sequence[Any]],
    now: datetime,
    *,
    commit: bool = False,
) -> Posted:
    """See LedgerRepository.post: LOCK_ACCOUNTS and POST sent together, one round trip
    whatever the batch size. With `commit`, the COMMIT goes in the same round trip too, so the
    accounts (the hot fee account among them) are held for no round trip to the client: the
    caller's transaction must have written nothing before, since it ends here whether the
    post applied (committed) or not (rolled back). Without `commit` the post runs in a
    savepoint, so a refusal undoes only the post and the transaction goes on."""
    accounts = sorted(deltas)
    params = {
        "accounts": array_literal(accounts),
        "deltas": array_literal([deltas[a] for a in accounts], "bigint"),
        "now": now,
        **_arrays("h", HOLD_WRITE_COLUMNS, holds),
        "h_was": array_literal([PENDING] * len(holds)),
        **_arrays("t", TRANSFER_INPUT_COLUMNS, transfers),
    }
    driver = await _connection(session)
    try:
        async with driver.pipeline():
            if not commit:
                await driver.execute("SAVEPOINT ledger_post", prepare=False)
            await driver.execute(LOCK_ACCOUNTS, {"accounts": params["accounts"]}, prepare=False)
            cursor = await driver.execute(POST, params, prepare=False, binary=True)
            # As statements, not driver.commit(): in a pipeline an error surfaces once, at
            # its end, rather than in commit() and again when the pipeline closes.
            end = "COMMIT" if commit else "RELEASE SAVEPOINT ledger_post"
            await driver.execute(end, prepare=False)
        rows = await cursor.fetchall()
    except psycopg.Error as error:
        if error.sqlstate != REFUSED:
            raise _wrapped(POST, params, error) from error
        return await _refused(driver, error, commit=commit)
    ok, written, recorded = rows[0][:3]
    balances = {row[3]: (row[4], row[5]) for row in rows if row[3] is not None}
    return Posted(bool(ok), int(written), int(recorded), balances)


async def _refused(
    driver: psycopg.AsyncConnection[Any], error: psycopg.Error, *, commit: bool
) -> Posted:
    """What ledger_refuse() reported, once its error is cleared: the transaction rolled back
    (`commit`: it was to end anyway) or back to the post's savepoint."""
    try:
        if commit:
            await driver.rollback()
        else:
            await driver.execute("ROLLBACK TO SAVEPOINT ledger_post", prepare=False)
    except psycopg.Error as cleanup:
        raise _wrapped(POST, {}, cleanup) from error
    report = json.loads(error.diag.message_detail or "{}")
    balances = {a: (int(b), bool(no)) for a, b, no in report.get("balances") or ()}
    return Posted(False, int(report["written"]), int(report["recorded"]), balances)
