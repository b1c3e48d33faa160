"""Persistence: typed ORM base, async engine and unit of work, Alembic migrations."""
