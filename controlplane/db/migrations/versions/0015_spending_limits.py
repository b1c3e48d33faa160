"""Per-tenant monthly spending limits and the alerts recorded at their thresholds

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 16:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spending_limits",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("monthly_limit", sa.BigInteger(), nullable=False),
        sa.Column("alert_percents", sa.String(length=64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("monthly_limit > 0", name=op.f("ck_spending_limits_positive_limit")),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_spending_limits")),
    )
    op.create_table(
        "spending_alerts",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("percent", sa.Integer(), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("monthly_limit", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "month", "percent", name=op.f("pk_spending_alerts")),
    )


def downgrade() -> None:
    op.drop_table("spending_alerts")
    op.drop_table("spending_limits")
