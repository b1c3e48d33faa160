"""ORM classes for tenants and API keys (keys are stored only as SHA-256 hashes)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime, utcnow


class Tenant(Base):
    __tablename__ = "tenants"
    # An idempotency key belongs to the tenant of the caller that sent it (an admin's).
    __table_args__ = (UniqueConstraint("idempotency_tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    fair_share_weight: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # The tenant of the caller whose idempotency key it is (keys are scoped per tenant).
    idempotency_tenant_id: Mapped[str | None] = mapped_column(String(40))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # RevokeProvider: its hosts and tokens were revoked; it can no longer mint its own
    # registration tokens (an admin still may, deliberately).
    provider_revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("idempotency_tenant_id", "idempotency_key"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(String(500), default="")
    # Enough of the secret to recognise it in a list, never enough to use it.
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    # The tenant of the caller whose idempotency key it is (keys are scoped per tenant).
    idempotency_tenant_id: Mapped[str | None] = mapped_column(String(40))
    request_hash: Mapped[str | None] = mapped_column(String(64))


class BrowserSession(Base):
    """A dashboard login: a browser's cookie token (stored only as its SHA-256) standing for
    the API key it was exchanged for. The key is checked on every call, so revoking it ends
    its browser sessions' access at once."""

    __tablename__ = "browser_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # Kept to a coarse resolution (AuthSessions.touch_every): the idle expiry counts from it.
    last_used_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The absolute expiry: created_at + the session's maximum life.
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
