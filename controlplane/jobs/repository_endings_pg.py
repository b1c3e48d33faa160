"""PostgreSQL statements of batched terminal reports: one to lock and read the batch's jobs and
attempts (with their holds' ids), one round trip to write them back with their events; each
a batch as one array per column (`unnest`), so its text is the same whatever the size."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, Integer, LargeBinary, Table
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.db.base import UtcDateTime
from controlplane.ledger.repository_pg import array_literal, execute, execute_all


def pg_type(column: Column[Any]) -> str:
    """The PostgreSQL type a column's values travel as in an array parameter."""
    kind = column.type
    if isinstance(kind, UtcDateTime):
        return "timestamptz"
    if isinstance(kind, JSON):
        return "json"
    if isinstance(kind, LargeBinary):
        return "bytea"
    if isinstance(kind, Boolean):
        return "boolean"
    if isinstance(kind, BigInteger):
        return "bigint"
    if isinstance(kind, Integer):
        return "integer"
    return "varchar"


def _param(values: Sequence[Any], sql_type: str) -> str:
    """One column of a batch as an array literal: JSON as its text, bytes as hex."""
    if sql_type == "json":
        values = [None if v is None else json.dumps(v) for v in values]
    elif sql_type == "bytea":
        values = [None if v is None else "\\x" + bytes(v).hex() for v in values]
    return array_literal(values, sql_type)


def _unnest(alias: str, columns: Sequence[tuple[str, str]]) -> str:
    arrays = ", ".join(f"%({alias}_{c})s::{t}[]" for c, t in columns)
    return f"unnest({arrays}) AS {alias}({', '.join(c for c, _ in columns)})"


def _params(
    alias: str, columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[Any]]
) -> dict[str, str]:
    values = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    return {f"{alias}_{c}": _param(v, t) for (c, t), v in zip(columns, values, strict=True)}


def typed(table: Table, names: Sequence[str]) -> list[tuple[str, str]]:
    return [(name, pg_type(table.c[name])) for name in names]


def lock_statement(jobs: Sequence[str], attempts: Sequence[str]) -> str:
    """Locks the attempts named and their jobs (job id order, as JobRepository.lock_jobs then
    lock_attempts would) and reads them, with the id of each job's hold (not locked: the
    ledger locks holds itself, after)."""
    columns = [f"j.{c}" for c in jobs] + [f"a.{c}" for c in attempts]
    return (
        f"SELECT {', '.join(columns)}, h.id FROM "
        f"{_unnest('k', [('job_id', 'varchar'), ('attempt', 'integer')])} "
        "JOIN jobs j ON j.id = k.job_id "
        "JOIN job_attempts a ON a.job_id = k.job_id AND a.attempt = k.attempt "
        "LEFT JOIN holds h ON h.job_id = j.id "
        "ORDER BY j.id, a.attempt FOR UPDATE OF j, a"
    )


async def lock(
    session: AsyncSession, statement: str, keys: Sequence[tuple[str, int]], times: Sequence[int]
) -> list[list[Any]]:
    """Runs lock_statement for `keys`; the values at `times` (timestamptz columns) in UTC, as
    the ORM's UtcDateTime gives them."""
    rows = await execute(
        session, statement, _params("k", [("job_id", "varchar"), ("attempt", "integer")], keys)
    )
    found = []
    for row in rows:
        values = list(row)
        for n in times:
            if values[n] is not None:
                values[n] = values[n].astimezone(UTC)
        found.append(values)
    return found


def update_statement(
    table: str, key: Sequence[tuple[str, str]], columns: Sequence[tuple[str, str]]
) -> str:
    sets = ", ".join(f"{c} = v.{c}" for c, _ in columns)
    match = " AND ".join(f"{table}.{c} = v.{c}" for c, _ in key)
    return f"UPDATE {table} SET {sets} FROM {_unnest('v', [*key, *columns])} WHERE {match}"


def insert_statement(table: str, columns: Sequence[tuple[str, str]]) -> str:
    names = ", ".join(c for c, _ in columns)
    return f"INSERT INTO {table} ({names}) SELECT {names} FROM {_unnest('v', columns)}"


async def write(
    session: AsyncSession,
    writes: Sequence[tuple[str, Sequence[tuple[str, str]], Sequence[Sequence[Any]]]],
    *,
    commit: bool = False,
) -> None:
    """Runs each (statement, its columns, rows) with rows present, all in one round trip;
    with `commit`, the transaction's COMMIT last in it."""
    statements = [(query, _params("v", columns, rows)) for query, columns, rows in writes if rows]
    if commit:
        statements.append(("COMMIT", {}))
    if statements:
        await execute_all(session, statements)
