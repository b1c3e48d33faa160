"""long-running services: services, their replicas (jobs of kind rep) and service_events

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06 23:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "services",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("live_name", sa.String(length=63), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("state_reason", sa.String(length=1000), nullable=False),
        sa.Column("spec", sa.LargeBinary(), nullable=False),
        sa.Column("desired_replicas", sa.Integer(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("launched", sa.Integer(), nullable=False),
        sa.Column("last_failure", sa.String(length=1000), nullable=False),
        sa.Column("backoff_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_services_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_services")),
        sa.UniqueConstraint("tenant_id", "live_name", name=op.f("uq_services_tenant_id_live_name")),
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name=op.f("uq_services_tenant_id_idempotency_key")
        ),
    )
    op.create_index(op.f("ix_services_tenant_id"), "services", ["tenant_id"])
    op.create_index(op.f("ix_services_state"), "services", ["state"])
    op.create_table(
        "service_replicas",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("service_id", sa.String(length=40), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("retired", sa.Boolean(), nullable=False),
        sa.Column("settled", sa.Boolean(), nullable=False),
        sa.Column("extensions", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_service_replicas_job_id_jobs")
        ),
        sa.ForeignKeyConstraint(
            ["service_id"], ["services.id"], name=op.f("fk_service_replicas_service_id_services")
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_service_replicas")),
    )
    op.create_index(op.f("ix_service_replicas_service_id"), "service_replicas", ["service_id"])
    op.create_table(
        "service_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("service_id", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["service_id"], ["services.id"], name=op.f("fk_service_events_service_id_services")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_events")),
    )
    op.create_index(op.f("ix_service_events_service_id"), "service_events", ["service_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_service_events_service_id"), table_name="service_events")
    op.drop_table("service_events")
    op.drop_index(op.f("ix_service_replicas_service_id"), table_name="service_replicas")
    op.drop_table("service_replicas")
    op.drop_index(op.f("ix_services_state"), table_name="services")
    op.drop_index(op.f("ix_services_tenant_id"), table_name="services")
    op.drop_table("services")
