"""job_attempts: the attempt's budget, the run time it pays for and the control plane's stop

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 16:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Attempts placed before this have no budget of their own: metering still stops them.
    with op.batch_alter_table("job_attempts") as batch:
        batch.add_column(sa.Column("budget", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("budget_ms", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("budget_stop_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_job_attempts_budget_stop_at", ["budget_stop_at"])


def downgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        batch.drop_index("ix_job_attempts_budget_stop_at")
        batch.drop_column("budget_stop_at")
        batch.drop_column("budget_ms")
        batch.drop_column("budget")
