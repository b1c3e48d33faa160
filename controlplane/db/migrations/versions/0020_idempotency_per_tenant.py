"""Idempotency keys are scoped to the caller's tenant

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 16:30:00.000000
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

# Tables whose rows an idempotent RPC creates: (table, column giving the caller of the rows
# stored before this revision). Tenants and API keys were created by admins, whose tenant
# was the bootstrap's "platform"; a registration token was most often minted by its own
# provider; a payout by its own tenant.
TABLES = {
    "tenants": sa.literal("platform"),
    "api_keys": sa.literal("platform"),
    "registration_tokens": sa.column("provider_tenant_id"),
    "payouts": sa.column("tenant_id"),
}
OLD_UNIQUE = {
    "tenants": ("idempotency_key",),
    "api_keys": ("idempotency_key",),
    "registration_tokens": ("idempotency_key",),
    "payouts": ("tenant_id", "idempotency_key"),
}
MAX_KEY_LENGTH = 200
PLATFORM = "platform"


def _name(table: str, columns: tuple[str, ...]) -> str:
    return f"uq_{table}_{'_'.join(columns)}"


def upgrade() -> None:
    for table, caller in TABLES.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("idempotency_tenant_id", sa.String(40), nullable=True))
        rows = sa.table(table, sa.column("idempotency_tenant_id"), sa.column("idempotency_key"))
        op.execute(
            rows.update()
            .where(rows.c.idempotency_key.is_not(None))
            .values(idempotency_tenant_id=caller)
        )
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(_name(table, OLD_UNIQUE[table]), type_="unique")
            new = ("idempotency_tenant_id", "idempotency_key")
            batch_op.create_unique_constraint(_name(table, new), list(new))
            if table == "payouts":
                batch_op.alter_column("idempotency_tenant_id", nullable=False)
    _scope_transfer_keys(lambda rest: f"{PLATFORM}/{rest}")


def downgrade() -> None:
    _scope_transfer_keys(lambda rest: rest.removeprefix(f"{PLATFORM}/"))
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(
                _name(table, ("idempotency_tenant_id", "idempotency_key")), type_="unique"
            )
            batch_op.create_unique_constraint(
                _name(table, OLD_UNIQUE[table]), list(OLD_UNIQUE[table])
            )
            batch_op.drop_column("idempotency_tenant_id")


def _scope_transfer_keys(change: Callable[[str], str]) -> None:
    """Deposit and refund transfers are keyed "deposit/<tenant>/<key>" and
    "refund/<tenant>/<key>/<n>" from this revision on: the ones stored before were an
    admin's, the platform's (a key that was hashed to fit cannot be recovered and keeps its
    value: a retry of it across the upgrade is a new request)."""
    bind = op.get_bind()
    transfers = sa.table("transfers", sa.column("id"), sa.column("idempotency_key"))
    rows = bind.execute(
        sa.select(transfers.c.id, transfers.c.idempotency_key).where(
            sa.or_(
                transfers.c.idempotency_key.like("deposit/%"),
                transfers.c.idempotency_key.like("refund/%"),
            )
        )
    ).all()
    for transfer_id, key in rows:
        kind, _, rest = key.partition("/")
        if rest.startswith("sha256/"):
            continue
        suffix = ""
        if kind == "refund":  # "refund/<key>/<n>": the key part may be hashed, never <n>
            rest, _, n = rest.rpartition("/")
            suffix = f"/{n}"
        new = f"{kind}/{change(rest)}"
        if len(new) > MAX_KEY_LENGTH:
            new = f"{kind}/sha256/{hashlib.sha256(new.encode()).hexdigest()}"
        new += suffix
        bind.execute(
            transfers.update().where(transfers.c.id == transfer_id).values(idempotency_key=new)
        )
