"""ledger: two-phase holds and payouts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

TS = sa.DateTime(timezone=True)

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "holds",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("posted_amount", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("provider_tenant_id", sa.String(length=40), nullable=True),
        sa.Column("attempt_charged", sa.BigInteger(), nullable=False),
        sa.Column("attempt_fee", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("hold_transfer_id", sa.String(length=40), nullable=True),
        sa.Column("release_transfer_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("resolved_at", TS, nullable=True),
        sa.CheckConstraint(
            "posted_amount >= 0 AND posted_amount <= amount", name=op.f("ck_holds_posted_in_hold")
        ),
        sa.CheckConstraint(
            "attempt_fee >= 0 AND attempt_fee <= attempt_charged", name=op.f("ck_holds_attempt_fee")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_holds")),
        sa.UniqueConstraint("job_id", name=op.f("uq_holds_job_id")),
        sa.UniqueConstraint("key", name=op.f("uq_holds_key")),
    )
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_holds_tenant_id"), ["tenant_id"], unique=False)
        batch_op.create_index("ix_holds_state_expires", ["state", "expires_at"], unique=False)
        batch_op.create_index(
            "ix_holds_provider_state", ["provider_tenant_id", "state"], unique=False
        )

    op.create_table(
        "payouts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("destination", sa.String(length=500), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("transfer_id", sa.String(length=40), nullable=False),
        sa.Column("reversal_transfer_id", sa.String(length=40), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_payouts_positive_amount")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payouts")),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name=op.f("uq_payouts_tenant_id_idempotency_key")
        ),
    )
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_payouts_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("payouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_payouts_tenant_id"))
    op.drop_table("payouts")
    with op.batch_alter_table("holds", schema=None) as batch_op:
        batch_op.drop_index("ix_holds_provider_state")
        batch_op.drop_index("ix_holds_state_expires")
        batch_op.drop_index(batch_op.f("ix_holds_tenant_id"))
    op.drop_table("holds")
