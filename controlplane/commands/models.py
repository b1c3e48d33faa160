"""ORM classes of stored host commands and of which replica holds each host's Connect stream."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, LargeBinary, String, text
from sqlalchemy.orm import Mapped, mapped_column

from controlplane.db.base import Base, UtcDateTime, utcnow

# The partial index holds only unacknowledged commands: the delivery loops read nothing else.
UNACKED_ONLY: dict[str, Any] = {
    "postgresql_where": text("acked_at IS NULL"),
    "sqlite_where": text("acked_at IS NULL"),
}


class HostCommand(Base):
    """One command to one host's daemon, like an outbox row: written in the transaction of
    the change it announces (a cancel requested, a drain), then delivered on the host's
    Connect stream and re-sent (`due_at`) until the daemon acknowledges it (`acked_at`)."""

    __tablename__ = "host_commands"
    __table_args__ = (Index("ix_host_commands_unacked", "host_id", "id", **UNACKED_ONLY),)

    # BIGINT on PostgreSQL, INTEGER on SQLite (where only INTEGER PRIMARY KEY autoincrements).
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"))
    # "cancel" | "drain" | "resync": the ControlMessage's field.
    kind: Mapped[str] = mapped_column(String(16))
    # The attempt a cancel or a resync is about (None for a drain or a resync of the host).
    job_id: Mapped[str | None] = mapped_column(String(40))
    attempt: Mapped[int | None] = mapped_column(Integer)
    # The ControlMessage without its command_id (set at each delivery).
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # When it is (re-)sent next, if the host's stream is held by a replica by then.
    due_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    acked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # applied | not_running (the daemon's answers) | superseded (a later drain) | moot (its
    # attempt ended first); None while unacknowledged.
    answer: Mapped[str | None] = mapped_column(String(16))


class HostStreamHolder(Base):
    """The replica that holds a host's Connect stream (the latest one opened): it alone
    delivers the host's commands. A replica that dies leaves its rows behind; the daemon's
    next Connect, to any replica, takes them over."""

    __tablename__ = "host_stream_holders"

    host_id: Mapped[str] = mapped_column(ForeignKey("hosts.id"), primary_key=True)
    replica: Mapped[str] = mapped_column(String(100), index=True)
    opened_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
