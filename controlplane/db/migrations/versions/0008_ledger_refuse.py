"""Ledger posting refuses inside its statement: ledger_refuse() (PostgreSQL only)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 08:30:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# Raised by repository_pg.POST when a post may not apply (an account missing or overdrawn, a
# hold no longer pending): the error undoes the whole statement, and its DETAIL says why.
# SQLSTATE GP001 is the project's own (class GP is none of PostgreSQL's).
CREATE = """
CREATE FUNCTION ledger_refuse(detail text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger post refused' USING ERRCODE = 'GP001', DETAIL = detail;
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(CREATE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION ledger_refuse(text)")
