"""Alembic environment: runs migrations on the synchronous URL set by controlplane.db.migrate."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from controlplane.db.models import Base

config = context.config
target_metadata = Base.metadata
# Serialises migrations of control-plane replicas starting at once on one PostgreSQL
# database (a transaction-level advisory lock: released at commit or rollback).
MIGRATION_LOCK = 0x67707571


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url must be set by controlplane.db.migrate"
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # The second replica waits here, then finds the schema current.
                connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            context.run_migrations()
    engine.dispose()


run_migrations()
