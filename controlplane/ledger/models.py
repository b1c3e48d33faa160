"""ORM classes for ledger accounts and immutable transfers."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, CheckConstraint, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime, utcnow


class Account(Base):
    __tablename__ = "accounts"

    # "<tenant_id>:<kind>" for tenant accounts, "platform:revenue", "platform:external".
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    # Consumer available/held and provider earnings may never go below zero.
    no_overdraft: Mapped[bool] = mapped_column(Boolean, default=True)


class Transfer(Base):
    """One debit and one credit of the same positive amount. Never updated or deleted."""

    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="positive_amount"),
        Index("ix_transfers_debit", "debit_account_id", "created_at"),
        Index("ix_transfers_credit", "credit_account_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    debit_account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    credit_account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(24))
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    attempt: Mapped[int | None] = mapped_column(Integer)
    reference: Mapped[str] = mapped_column(String(500), default="")
    debit_balance_after: Mapped[int] = mapped_column(BigInteger)
    credit_balance_after: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
