"""Migration 0020 on a database with rows: the idempotency keys stored before it keep
answering their caller (the provider for its tokens and payouts, the platform for tenants,
API keys, deposits and refunds), and a downgrade puts the transfer keys back."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from controlplane.db import migrate

pytestmark = pytest.mark.databases("sqlite", "postgresql")
NOW = datetime(2026, 12, 1, tzinfo=UTC)
LONG = "k" * 190  # "deposit/platform/" + LONG no longer fits 200 characters: hashed
ROWS = [
    "INSERT INTO tenants (id, name, fair_share_weight, created_at, idempotency_key) "
    "VALUES ('platform', 'platform', 1, :now, NULL), ('ten_a', 'a', 1, :now, 'made-a')",
    "INSERT INTO api_keys (id, tenant_id, role, description, prefix, secret_hash, created_at, "
    "idempotency_key) VALUES ('key_a', 'ten_a', 'consumer', '', 'gpk_', 'h1', :now, 'key-a')",
    "INSERT INTO registration_tokens (id, provider_tenant_id, label, secret_hash, created_at, "
    "expires_at, max_uses, uses, idempotency_key) "
    "VALUES ('rt_a', 'ten_a', '', 'h2', :now, :now, 0, 0, 'rack')",
    "INSERT INTO payouts (id, tenant_id, amount, destination, state, idempotency_key, "
    "transfer_id, reason, created_at, updated_at) "
    "VALUES ('po_a', 'ten_a', 5, 'iban', 'pending', 'p1', 'tr_p', '', :now, :now)",
    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, kind, "
    "idempotency_key, reference, debit_balance_after, credit_balance_after, created_at) VALUES "
    "('tr_d', 'x', 'y', 1, 'deposit', 'deposit/wire-1', '', 0, 0, :now), "
    "('tr_l', 'x', 'y', 1, 'deposit', :long_deposit, '', 0, 0, :now), "
    "('tr_r', 'x', 'y', 1, 'refund', 'refund/slow/gpu/0', '', 0, 0, :now), "
    "('tr_h', 'x', 'y', 1, 'refund', 'refund/sha256/abc/0', '', 0, 0, :now), "
    "('tr_c', 'x', 'y', 1, 'charge', 'job/j/1/final/charge', '', 0, 0, :now)",
]


def _rows(url: str, query: str) -> dict[str, object]:
    engine = create_engine(migrate.sync_url(url))
    try:
        with engine.connect() as connection:
            return {row[0]: row[1] for row in connection.execute(text(query))}
    finally:
        engine.dispose()


def _fill(url: str) -> None:
    engine = create_engine(migrate.sync_url(url))
    try:
        with engine.begin() as connection:
            for statement in ROWS:
                connection.execute(text(statement), {"now": NOW, "long_deposit": f"deposit/{LONG}"})
    finally:
        engine.dispose()


async def test_keys_stored_before_keep_their_caller(database_url: str, tmp_path: Path) -> None:
    from controlplane.ledger.transfers import scoped_key

    url = database_url or f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    await asyncio.to_thread(migrate.upgrade, url, "0011")
    await asyncio.to_thread(_fill, url)
    await asyncio.to_thread(migrate.upgrade, url, "0020")
    for table, caller in (
        ("tenants", {"platform": None, "ten_a": "platform"}),
        ("api_keys", {"key_a": "platform"}),
        ("registration_tokens", {"rt_a": "ten_a"}),
        ("payouts", {"po_a": "ten_a"}),
    ):
        query = f"SELECT id, idempotency_tenant_id FROM {table}"
        assert await asyncio.to_thread(_rows, url, query) == caller, table
    keys = await asyncio.to_thread(_rows, url, "SELECT id, idempotency_key FROM transfers")
    assert keys == {
        # What the deposit and refund code computes for the platform's keys now.
        "tr_d": scoped_key("deposit", "platform", "wire-1"),
        "tr_l": scoped_key("deposit", "platform", LONG),
        "tr_r": scoped_key("refund", "platform", "slow/gpu") + "/0",
        "tr_h": "refund/sha256/abc/0",  # hashed before: cannot be recovered, kept
        "tr_c": "job/j/1/final/charge",
    }
    assert str(keys["tr_l"]).startswith("deposit/sha256/")
    await asyncio.to_thread(migrate.downgrade, url, "0019")
    keys = await asyncio.to_thread(_rows, url, "SELECT id, idempotency_key FROM transfers")
    assert keys["tr_d"] == "deposit/wire-1"
    assert keys["tr_r"] == "refund/slow/gpu/0"
