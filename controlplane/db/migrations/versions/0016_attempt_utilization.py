"""Per-attempt GPU utilisation and peak memory, persisted from telemetry

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 16:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

COLUMNS = ("gpu_utilization_sum", "gpu_utilization_samples", "peak_gpu_memory_bytes")


def upgrade() -> None:
    # Added to by every control plane's periodic flush of what it measured (a sum, a count
    # and a maximum combine across replicas and restarts); read by GetJob and GetUsage.
    with op.batch_alter_table("job_attempts") as batch:
        for name in COLUMNS:
            batch.add_column(
                sa.Column(name, sa.BigInteger(), nullable=False, server_default=sa.text("0"))
            )


def downgrade() -> None:
    with op.batch_alter_table("job_attempts") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
