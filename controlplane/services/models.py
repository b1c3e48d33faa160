"""ORM classes for services, their replicas (jobs of kind `rep`) and their history."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime, utcnow


class Service(Base):
    __tablename__ = "services"
    __table_args__ = (
        # live_name is the name while the service is not deleted, NULL once it is: NULLs never
        # collide, so a deleted service's name is free again (on SQLite and PostgreSQL alike).
        UniqueConstraint("tenant_id", "live_name"),
        UniqueConstraint("tenant_id", "idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(63))
    live_name: Mapped[str | None] = mapped_column(String(63))
    # active | stopped | deleted: ServiceState, written only by services.states.
    state: Mapped[str] = mapped_column(String(16), index=True)
    state_reason: Mapped[str] = mapped_column(String(1000), default="")
    # The JobSpec each replica runs (protobuf bytes; its service_replica set).
    spec: Mapped[bytes] = mapped_column(LargeBinary)
    desired_replicas: Mapped[int] = mapped_column(Integer)
    # Replicas started to replace one that ended other than by a scale-down.
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    # Replica failures since the last healthy period: the backoff's exponent.
    failures: Mapped[int] = mapped_column(Integer, default=0)
    # Replicas launched so far: the next launch's idempotency key (a launch interrupted
    # between submitting the job and recording it finds the same job again).
    launched: Mapped[int] = mapped_column(Integer, default=0)
    last_failure: Mapped[str] = mapped_column(String(1000), default="")
    backoff_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ServiceReplica(Base):
    """A job the service started as one of its replicas."""

    __tablename__ = "service_replicas"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    service_id: Mapped[str] = mapped_column(ForeignKey("services.id"), index=True)
    # Its latest health probe passed (kept by the control plane for the gateway).
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    # The service asked it to stop (scale-down, stop, delete): its ending is no failure.
    retired: Mapped[bool] = mapped_column(Boolean, default=False)
    # Its ending was looked at by the reconciler (counted as a failure, or not).
    settled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Lease extensions already paid for (the next one's idempotency key).
    extensions: Mapped[int] = mapped_column(Integer, default=0)
    # Its daemon restarted its container in place this many times (ReplicaHealth.restarts:
    # the provider's word, shown and recorded as events, never billed).
    restarts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ServiceEvent(Base):
    """A service's history: its state changes and what the reconciler did."""

    __tablename__ = "service_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    service_id: Mapped[str] = mapped_column(ForeignKey("services.id"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1000), default="")
    time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ServiceKey(Base):
    """A caller key of one service: its bearer secret (`gsk_…`, stored only as its SHA-256)
    reaches that service through the gateway and nothing else."""

    __tablename__ = "service_keys"
    __table_args__ = (UniqueConstraint("service_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    service_id: Mapped[str] = mapped_column(ForeignKey("services.id"), index=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    # Enough of the secret to recognise it in a list, never enough to use it.
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The creator's key, per service (a retried CreateServiceKey finds the same key).
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64), default="")
