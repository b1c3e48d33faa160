"""ORM classes for ledger accounts, immutable transfers, two-phase holds and payouts."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Index,
    Integer,
    String,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnClause

from controlplane.db.base import Base, UtcDateTime, utcnow

# The states live with their machines (ledger/states.py); re-exported for older imports.
from controlplane.ledger.states import HoldState as HoldState
from controlplane.ledger.states import PayoutState as PayoutState


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
    # Accounts by id, with no foreign key: the one statement that inserts transfers
    # (repository_pg.POST; its SQLite twin) joins them to the accounts it has just updated,
    # so none names a missing account, and a foreign-key check would repeat that under the
    # accounts' locks (a quarter of a settlement batch's time on the hot fee account).
    debit_account_id: Mapped[str] = mapped_column(String(64))
    credit_account_id: Mapped[str] = mapped_column(String(64))
    amount: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(24))
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    attempt: Mapped[int | None] = mapped_column(Integer)
    reference: Mapped[str] = mapped_column(String(500), default="")
    debit_balance_after: Mapped[int] = mapped_column(BigInteger)
    credit_balance_after: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


# Where a partial index holds only pending holds. Queries that should use one spell the state
# as a literal (PENDING_STATE), not a parameter: a cached generic plan cannot prove a
# parameter matches the index's predicate.
PENDING_STATE: ColumnClause[str] = literal_column("'pending'")
PENDING_ONLY: dict[str, Any] = {
    "postgresql_where": text("state = 'pending'"),
    "sqlite_where": text("state = 'pending'"),
}


class Hold(Base):
    """A two-phase reservation of a consumer's credit (available → held) for one job.

    While PENDING it is charged in increments (metering) up to `amount`; it is then resolved
    once: posted, voided or expired, and whatever was not charged goes back to available."""

    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("posted_amount >= 0 AND posted_amount <= amount", name="posted_in_hold"),
        CheckConstraint("attempt_fee >= 0 AND attempt_fee <= attempt_charged", name="attempt_fee"),
        # Pending holds only: the expiry sweep and the payout check look for nothing else,
        # and resolving a hold (a new row version) then adds no entry to either.
        Index("ix_holds_pending_expires", "expires_at", **PENDING_ONLY),
        Index("ix_holds_pending_provider", "provider_tenant_id", **PENDING_ONLY),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Idempotency key of the hold ("job/<id>/hold" for a job's hold).
    key: Mapped[str] = mapped_column(String(200), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    # No foreign key: the ledger does not depend on the jobs tables (as transfers.job_id).
    job_id: Mapped[str | None] = mapped_column(String(40), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    # Net charged from the hold: charges minus provider-fault refunds back into it.
    posted_amount: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16), default=HoldState.PENDING.value)
    # The attempt being metered, its provider and what it was charged so far (fee part
    # included). Its provider share stays refundable (a provider fault) until the hold is
    # resolved, so it is not payable out of the provider's earnings before then.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    provider_tenant_id: Mapped[str | None] = mapped_column(String(40))
    attempt_charged: Mapped[int] = mapped_column(BigInteger, default=0)
    attempt_fee: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    hold_transfer_id: Mapped[str | None] = mapped_column(String(40))
    release_transfer_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class Payout(Base):
    """Earnings leaving the platform (earnings → external) to a destination."""

    __tablename__ = "payouts"
    __table_args__ = (
        # Keys are scoped to the caller's tenant (an admin paying out for a tenant has its own).
        UniqueConstraint("idempotency_tenant_id", "idempotency_key"),
        CheckConstraint("amount > 0", name="positive_amount"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    destination: Mapped[str] = mapped_column(String(500))
    state: Mapped[str] = mapped_column(String(16), default=PayoutState.PENDING.value)
    idempotency_key: Mapped[str] = mapped_column(String(200))
    # The tenant of the caller whose idempotency key it is.
    idempotency_tenant_id: Mapped[str] = mapped_column(String(40))
    transfer_id: Mapped[str] = mapped_column(String(40))
    reversal_transfer_id: Mapped[str | None] = mapped_column(String(40))
    reason: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class PlatformFee(Base):
    """The platform fee an operator set at run time (SetPricingPolicy): one row, id 1. With
    no row the fee is the settings' (GPUPLANE_PLATFORM_FEE_BASIS_POINTS)."""

    __tablename__ = "platform_fee"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    fee_basis_points: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class SpendingLimit(Base):
    """A tenant's monthly spending limit (SetSpendingLimit): one row per limited tenant. Its
    row is locked by every hold the tenant places, so concurrent submits see each other."""

    __tablename__ = "spending_limits"
    __table_args__ = (CheckConstraint("monthly_limit > 0", name="positive_limit"),)

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    monthly_limit: Mapped[int] = mapped_column(BigInteger)
    # Percentages of the limit at which an alert is recorded, ascending ("50,80,100").
    alert_percents: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class SpendingAlert(Base):
    """A threshold of a tenant's spending limit crossed in a month: recorded once (the key)."""

    __tablename__ = "spending_alerts"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The calendar month (UTC), "YYYY-MM".
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    percent: Mapped[int] = mapped_column(Integer, primary_key=True)
    spent: Mapped[int] = mapped_column(BigInteger)
    monthly_limit: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
