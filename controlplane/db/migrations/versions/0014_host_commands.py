"""host_commands and host_stream_holders: commands reach a daemon from any replica

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06 16:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UNACKED = sa.text("acked_at IS NULL")


def upgrade() -> None:
    op.create_table(
        "host_commands",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("acked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answer", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name=op.f("fk_host_commands_host_id_hosts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_host_commands")),
    )
    op.create_index(
        "ix_host_commands_unacked",
        "host_commands",
        ["host_id", "id"],
        postgresql_where=UNACKED,
        sqlite_where=UNACKED,
    )
    op.create_table(
        "host_stream_holders",
        sa.Column("host_id", sa.String(length=40), nullable=False),
        sa.Column("replica", sa.String(length=100), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name=op.f("fk_host_stream_holders_host_id_hosts")
        ),
        sa.PrimaryKeyConstraint("host_id", name=op.f("pk_host_stream_holders")),
    )
    op.create_index(op.f("ix_host_stream_holders_replica"), "host_stream_holders", ["replica"])


def downgrade() -> None:
    op.drop_index(op.f("ix_host_stream_holders_replica"), table_name="host_stream_holders")
    op.drop_table("host_stream_holders")
    op.drop_index("ix_host_commands_unacked", table_name="host_commands")
    op.drop_table("host_commands")
