"""ORM class of the scheduler lease: the epoch of the current scheduling leader's term."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime


class SchedulerLease(Base):
    """One row per leadership (today only "scheduler"). Each new leader term increments
    `epoch`; a placement commits only while the row still holds its leader's epoch."""

    __tablename__ = "scheduler_lease"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    # Who took the current term (host/pid/nonce), for operators and tests.
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime)
