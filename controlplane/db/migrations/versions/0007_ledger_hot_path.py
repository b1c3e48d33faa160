"""Ledger hot path: transfers' account columns without foreign keys; holds' state indexes
partial (pending holds only)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 06:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.drop_constraint("fk_transfers_debit_account_id_accounts", type_="foreignkey")
        batch_op.drop_constraint("fk_transfers_credit_account_id_accounts", type_="foreignkey")
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_index("ix_holds_provider_state")
        batch_op.drop_index("ix_holds_state_expires")
        batch_op.create_index(
            "ix_holds_pending_expires", ["expires_at"], postgresql_where=PENDING,
            sqlite_where=PENDING,
        )  # fmt: skip
        batch_op.create_index(
            "ix_holds_pending_provider", ["provider_tenant_id"], postgresql_where=PENDING,
            sqlite_where=PENDING,
        )  # fmt: skip


def downgrade() -> None:
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_index("ix_holds_pending_provider")
        batch_op.drop_index("ix_holds_pending_expires")
        batch_op.create_index("ix_holds_state_expires", ["state", "expires_at"], unique=False)
        batch_op.create_index(
            "ix_holds_provider_state", ["provider_tenant_id", "state"], unique=False
        )
    with op.batch_alter_table("transfers", schema=None) as batch_op:
        batch_op.create_foreign_key(
            "fk_transfers_debit_account_id_accounts", "accounts", ["debit_account_id"], ["id"]
        )
        batch_op.create_foreign_key(
            "fk_transfers_credit_account_id_accounts", "accounts", ["credit_account_id"], ["id"]
        )
