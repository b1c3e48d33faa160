"""ORM class of an uploaded input: its key in the tenant's input area, size and SHA-256."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime, utcnow


class InputRecord(Base):
    """What CompleteUpload read back from storage; jobs naming the key carry its sha256."""

    __tablename__ = "inputs"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    # Relative to inputs/<tenant_id>/ (storage/layout.py input_key).
    key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    uploaded_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
