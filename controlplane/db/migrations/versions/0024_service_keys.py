"""service caller keys: bearer secrets (stored hashed) that reach one service's gateway routes

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-07 01:45:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "service_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("service_id", sa.String(length=40), nullable=False),
        sa.Column("description", sa.String(length=500), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["service_id"], ["services.id"], name=op.f("fk_service_keys_service_id_services")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_keys")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_service_keys_secret_hash")),
        sa.UniqueConstraint(
            "service_id",
            "idempotency_key",
            name=op.f("uq_service_keys_service_id_idempotency_key"),
        ),
    )
    op.create_index(op.f("ix_service_keys_service_id"), "service_keys", ["service_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_service_keys_service_id"), table_name="service_keys")
    op.drop_table("service_keys")
