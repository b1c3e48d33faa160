"""host_events: every change of a host's state and why (registry.states.set_host_state)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 13:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["host_id"], ["hosts.id"], name=op.f("fk_host_events_host_id_hosts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_host_events")),
    )
    op.create_index("ix_host_events_host_id", "host_events", ["host_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_host_events_host_id", table_name="host_events")
    op.drop_table("host_events")
