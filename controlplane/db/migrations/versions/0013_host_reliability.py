"""hosts.reliability_good / reliability_bad / reliability_at: outcomes decayed by age;
registration_tokens.self_service, hosts.self_service: minted by the provider itself;
tenants.provider_revoked_at (RevokeProvider)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 16:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("reliability_good", sa.Float(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("reliability_bad", sa.Float(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("reliability_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("self_service", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("registration_tokens", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("self_service", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("provider_revoked_at", sa.DateTime(timezone=True), nullable=True)
        )
    # What hosts did so far counts from now on, then fades like any outcome.
    op.execute(
        "UPDATE hosts SET reliability_good = completed_attempts, "
        "reliability_bad = lost_attempts + gpu_faults, reliability_at = CURRENT_TIMESTAMP "
        "WHERE completed_attempts + lost_attempts + gpu_faults > 0"
    )


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("provider_revoked_at")
    with op.batch_alter_table("registration_tokens", schema=None) as batch_op:
        batch_op.drop_column("self_service")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("self_service")
        batch_op.drop_column("reliability_at")
        batch_op.drop_column("reliability_bad")
        batch_op.drop_column("reliability_good")
