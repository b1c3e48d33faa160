"""PostgreSQL statements of attempts ending on hosts: their GPUs freed and their hosts locked
and read in one round trip, the hosts written back in one statement (`unnest` arrays)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.ledger.repository_pg import array_literal, execute, execute_all

RELEASE_GPUS = (
    "UPDATE gpus SET job_id = NULL, attempt = NULL "
    "FROM unnest(%(g_job)s::varchar[], %(g_attempt)s::integer[]) AS g(job_id, attempt) "
    "WHERE gpus.job_id = g.job_id AND gpus.attempt = g.attempt"
)
LOCK_HOSTS = (
    "SELECT id, provider_tenant_id, completed_attempts, reliability_good, reliability_bad, "
    "reliability_at FROM hosts WHERE id = ANY(%(ids)s::varchar[]) ORDER BY id FOR UPDATE"
)
WRITE_HOSTS = (
    "UPDATE hosts SET completed_attempts = v.completed, reliability_good = v.good, "
    "reliability_bad = v.bad, reliability_at = v.at FROM unnest(%(v_id)s::varchar[], "
    "%(v_completed)s::integer[], %(v_good)s::float8[], %(v_bad)s::float8[], "
    "%(v_at)s::timestamptz[]) AS v(id, completed, good, bad, at) WHERE hosts.id = v.id"
)


async def release_and_lock(
    session: AsyncSession, release: Collection[tuple[str, int]], host_ids: Sequence[str]
) -> list[list[Any]]:
    """Frees the GPUs of the attempts named (job id, attempt), then locks the hosts (id order)
    and reads their counts (LOCK_HOSTS' columns, reliability_at in UTC): one round trip."""
    lock = (LOCK_HOSTS, {"ids": array_literal(host_ids)})
    if release:
        jobs, attempts = zip(*release, strict=True)
        params = {"g_job": array_literal(jobs), "g_attempt": array_literal(attempts, "integer")}
        rows = await execute_all(session, [(RELEASE_GPUS, params), lock])
    else:
        rows = await execute(session, *lock)
    found = [list(row) for row in rows]
    for row in found:
        if row[5] is not None:
            row[5] = row[5].astimezone(UTC)
    return found


async def write_hosts(session: AsyncSession, rows: Sequence[Sequence[Any]]) -> None:
    """Writes (id, completed_attempts, reliability_good, reliability_bad, reliability_at) back."""
    columns = list(zip(*rows, strict=True))
    types = ("varchar", "integer", "float8", "float8", "timestamptz")
    names = ("id", "completed", "good", "bad", "at")
    params = {
        f"v_{name}": array_literal(values, kind)
        for name, kind, values in zip(names, types, columns, strict=True)
    }
    await execute_all(session, [(WRITE_HOSTS, params)])
