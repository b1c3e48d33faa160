"""ORM class of hardware verification probes: each challenge sent to a host and its outcome."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime


class HostProbe(Base):
    """One verification challenge to one host: stored with the command that carries it,
    answered on the host's Connect stream by its deadline or failed."""

    __tablename__ = "host_probes"
    __table_args__ = (Index("ix_host_probes_host_id", "host_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"))
    n: Mapped[int] = mapped_column(Integer)
    rounds: Mapped[int] = mapped_column(Integer)
    # The seeds, SEED_BYTES each, one per GPU (gpu_uuids, by index), concatenated.
    seeds: Mapped[bytes] = mapped_column(LargeBinary)
    gpu_uuids: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # The GPUs and driver the probe verifies (registry fingerprint), kept on a pass.
    fingerprint: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deadline_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    # The indices of the GPUs whose answer passed so far (each GPU answers on its own).
    passed: Mapped[list[Any]] = mapped_column(JSON, default=list)
    answered_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # None while pending; "passed" or "failed".
    outcome: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(500), default="")
    # How long the control plane's check of the answer took, in microseconds.
    check_us: Mapped[int] = mapped_column(BigInteger, default=0)
