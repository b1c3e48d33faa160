"""Earnings may go below zero (a receivable); the platform fee set at run time

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 14:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A refund after a payout takes the provider's earnings below zero: what it owes the
    # platform, paid off by its next charges (DESIGN.md, Ledger). Payouts check what is
    # payable themselves, under the earnings account's lock.
    op.execute("UPDATE accounts SET no_overdraft = false WHERE kind = 'earnings'")
    op.create_table(
        "platform_fee",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fee_basis_points", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_platform_fee")),
    )


def downgrade() -> None:
    op.drop_table("platform_fee")
    op.execute("UPDATE accounts SET no_overdraft = true WHERE kind = 'earnings'")
