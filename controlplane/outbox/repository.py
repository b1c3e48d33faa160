"""All SQL for the outbox."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.outbox.models import OutboxMessage


class OutboxRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def enqueue(self, subject: str, msg_id: str, payload: bytes, now: datetime) -> None:
        """Adds a message to publish once the caller's transaction commits."""
        self.session.add(
            OutboxMessage(subject=subject, msg_id=msg_id, payload=payload, created_at=now)
        )

    async def pending(self, limit: int) -> Sequence[OutboxMessage]:
        return (
            await self.session.scalars(
                select(OutboxMessage)
                .where(OutboxMessage.published_at.is_(None))
                .order_by(OutboxMessage.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()

    async def mark_published(self, ids: Sequence[int], when: datetime) -> None:
        await self.session.execute(
            update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(published_at=when)
        )
