"""hosts.nats_user_key / revoked_at / revoked_reason; nats_revocations (RevokeHost)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 23:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nats_user_key", sa.String(length=56), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("revoked_reason", sa.String(length=500), nullable=False, server_default="")
        )
    op.create_table(
        "nats_revocations",
        sa.Column("public_key", sa.String(length=56), nullable=False),
        sa.Column("host_id", sa.String(length=40), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("public_key"),
    )
    op.create_index("ix_nats_revocations_host_id", "nats_revocations", ["host_id"])


def downgrade() -> None:
    op.drop_index("ix_nats_revocations_host_id", table_name="nats_revocations")
    op.drop_table("nats_revocations")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("revoked_reason")
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("nats_user_key")
