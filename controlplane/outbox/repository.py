"""All SQL for the outbox."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.outbox.models import OutboxMessage


def _unpublished_and_free(now: datetime) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """Rows not yet published and not held by a live relay lease."""
    return (
        OutboxMessage.published_at.is_(None),
        or_(OutboxMessage.leased_until.is_(None), OutboxMessage.leased_until <= now),
    )


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def enqueue(self, subject: str, msg_id: str, payload: bytes, now: datetime) -> None:
        """Adds a message to publish once the caller's transaction commits."""
        self.session.add(
            OutboxMessage(subject=subject, msg_id=msg_id, payload=payload, created_at=now)
        )

    async def any_pending(self, now: datetime) -> bool:
        """Whether a row waits for a relay (a plain read: takes no lock)."""
        found = await self.session.scalar(
            select(OutboxMessage.id).where(*_unpublished_and_free(now)).limit(1)
        )
        return found is not None

    async def lease(self, limit: int, now: datetime, until: datetime) -> Sequence[OutboxMessage]:
        """Takes up to `limit` unpublished rows, oldest first, for one relay until `until`:
        rows another relay is leasing right now (locked) or holds (lease not yet passed) are
        skipped, so concurrent relays publish disjoint batches."""
        rows = (
            await self.session.scalars(
                select(OutboxMessage)
                .where(*_unpublished_and_free(now))
                .order_by(OutboxMessage.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
        if rows:
            await self.session.execute(
                update(OutboxMessage)
                .where(OutboxMessage.id.in_([r.id for r in rows]))
                .values(leased_until=until)
                .execution_options(synchronize_session=False)
            )
        return rows

    async def mark_published(self, ids: Sequence[int], when: datetime) -> None:
        await self.session.execute(
            update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(published_at=when)
        )

    async def release(self, ids: Sequence[int]) -> None:
        """Gives leased rows back (a relay that could not publish them) for the next pass."""
        await self.session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id.in_(ids), OutboxMessage.published_at.is_(None))
            .values(leased_until=None)
        )
