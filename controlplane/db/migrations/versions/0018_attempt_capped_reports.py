"""job_attempts: how many of the attempt's reports claimed more run time than was observed

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        batch.add_column(
            sa.Column("capped_reports", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        batch.drop_column("capped_reports")
