"""ORM classes for registration tokens, hosts and their GPUs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime, utcnow
from controlplane.registry.reliability import ProviderBook


class RegistrationToken(Base):
    __tablename__ = "registration_tokens"
    __table_args__ = (UniqueConstraint("idempotency_tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    label: Mapped[str] = mapped_column(String(200), default="")
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    max_uses: Mapped[int] = mapped_column(Integer, default=0)
    uses: Mapped[int] = mapped_column(Integer, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # The tenant of the caller whose idempotency key it is (keys are scoped per tenant).
    idempotency_tenant_id: Mapped[str | None] = mapped_column(String(40))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Minted by the provider itself (self-service onboarding), not by an admin.
    self_service: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class Host(Base):
    __tablename__ = "hosts"
    __table_args__ = (UniqueConstraint("provider_tenant_id", "machine_id"),)
    # `reliability` below is not a column.
    __allow_unmapped__ = True

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider_tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    machine_id: Mapped[str] = mapped_column(String(200))
    hostname: Mapped[str] = mapped_column(String(255))
    # registered | online | lost | draining | drained: HostState, written only by registry.states
    # (set_host_state, which records each change in host_events).
    state: Mapped[str] = mapped_column(String(16), index=True)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    location: Mapped[str] = mapped_column(String(100), default="")
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    price_per_gpu_hour: Mapped[int] = mapped_column(BigInteger)
    credential_hash: Mapped[str] = mapped_column(String(64), unique=True)
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    daemon_version: Mapped[str] = mapped_column(String(64), default="")
    driver_version: Mapped[str] = mapped_column(String(64), default="")
    cuda_driver_version: Mapped[str] = mapped_column(String(64), default="")
    cpu_count: Mapped[int] = mapped_column(Integer, default=0)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    drain_reason: Mapped[str] = mapped_column(String(500), default="")
    lost_attempts: Mapped[int] = mapped_column(Integer, default=0)
    completed_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # GPUs of the host that went unhealthy (XID, uncorrectable ECC growth, vanished).
    gpu_faults: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The public nkey of the host's current NATS user (None while NATS auth is off).
    nats_user_key: Mapped[str | None] = mapped_column(String(56))
    # RevokeHost: the credential and NATS user stop working; the host never returns.
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_reason: Mapped[str] = mapped_column(String(500), default="", server_default="")
    # Registered with a token its provider minted itself: such a host must always pass
    # verification before it is offered (registry.states.hello_state).
    self_service: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Outcomes (completed / lost to the host or a GPU fault), each decayed by its age to
    # reliability_at (registry.reliability.note_outcome); kept across re-registrations.
    reliability_good: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    reliability_bad: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    reliability_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # The Ed25519 public key (32 raw bytes) the daemon gave at its last registration: its job
    # reports and provenance must be signed by it (jobs/signatures.py). None: a host of an
    # earlier release, whose reports are refused while signed reports are required.
    signing_public_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Hardware verification (controlplane/verification), a flag beside the state: when the
    # latest probe passed for the GPUs and driver hashed in verified_fingerprint (None: not
    # verified), and why not. Written only by registry.states.set_verification.
    verified_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    verification_reason: Mapped[str] = mapped_column(
        String(500), default="not probed yet", server_default="not probed yet"
    )
    verified_fingerprint: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # Not stored: the host's score over its provider's (registry.reliability.ProviderBook),
    # set by the registry on the hosts it returns; None until then.
    reliability: int | None = None

    @property
    def reliability_permille(self) -> int:
        """The score set by the registry; without it, the host's own over the prior."""
        if self.reliability is not None:
            return self.reliability
        return ProviderBook([self], utcnow()).host_permille(self)


class HostEvent(Base):
    """One change of a host's state and why (registry.states.set_host_state writes it)."""

    __tablename__ = "host_events"
    __table_args__ = (Index("ix_host_events_host_id", "host_id", "id"),)

    # BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY autoincrements).
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(1000), default="")
    time: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class NatsRevocation(Base):
    """A NATS user key the application account refuses (the account JWT's `revocations`):
    a revoked host's, or a host's earlier key replaced by re-registration."""

    __tablename__ = "nats_revocations"

    public_key: Mapped[str] = mapped_column(String(56), primary_key=True)
    host_id: Mapped[str] = mapped_column(String(40), index=True)
    revoked_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Gpu(Base):
    __tablename__ = "gpus"

    uuid: Mapped[str] = mapped_column(String(100), primary_key=True)
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    memory_total_bytes: Mapped[int] = mapped_column(BigInteger)
    compute_capability: Mapped[str] = mapped_column(String(16), default="")
    pci_bus_id: Mapped[str] = mapped_column(String(64), default="")
    mig_mode: Mapped[int] = mapped_column(Integer, default=0)
    power_limit_milliwatts: Mapped[int] = mapped_column(BigInteger, default=0)
    healthy: Mapped[bool] = mapped_column(Boolean, default=True)
    unhealthy_reason: Mapped[str] = mapped_column(String(500), default="")
    # The job whose live attempt holds this GPU; set and cleared only with a guard on its
    # previous value, so no GPU is ever given to two live attempts.
    job_id: Mapped[str | None] = mapped_column(String(40), index=True)
    attempt: Mapped[int | None] = mapped_column(Integer)
