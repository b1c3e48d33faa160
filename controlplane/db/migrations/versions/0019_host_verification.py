"""host verification: hosts' verified flag and host_probes (hardware verification probes)

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06 17:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column(
                "verification_reason",
                sa.String(length=500),
                nullable=False,
                server_default="not probed yet",
            )
        )
        batch_op.add_column(
            sa.Column(
                "verified_fingerprint", sa.String(length=64), nullable=False, server_default=""
            )
        )
    op.create_table(
        "host_probes",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=40), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("seeds", sa.LargeBinary(), nullable=False),
        sa.Column("gpu_uuids", sa.JSON(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("passed", sa.JSON(), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=False),
        sa.Column("check_us", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name=op.f("fk_host_probes_host_id_hosts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_host_probes")),
    )
    op.create_index("ix_host_probes_host_id", "host_probes", ["host_id", "id"])
    op.create_index(op.f("ix_host_probes_deadline_at"), "host_probes", ["deadline_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_host_probes_deadline_at"), table_name="host_probes")
    op.drop_index("ix_host_probes_host_id", table_name="host_probes")
    op.drop_table("host_probes")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("verified_fingerprint")
        batch_op.drop_column("verification_reason")
        batch_op.drop_column("verified_at")
