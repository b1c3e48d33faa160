"""hosts.signing_public_key: the daemon's Ed25519 key; job_attempts.host_provenance,
host_provenance_signature, provenance: the attempt's signed provenance document

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06 17:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("signing_public_key", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("host_provenance", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("host_provenance_signature", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("provenance", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_attempts", schema=None) as batch_op:
        batch_op.drop_column("provenance")
        batch_op.drop_column("host_provenance_signature")
        batch_op.drop_column("host_provenance")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("signing_public_key")
