"""All SQL for the dashboard's browser sessions."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.models import ApiKey, BrowserSession


class BrowserSessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, row: BrowserSession) -> None:
        self.session.add(row)

    async def with_key(self, token_hash: str) -> tuple[BrowserSession, ApiKey] | None:
        """The session of a token hash and the API key it stands for, if any."""
        row = (
            await self.session.execute(
                select(BrowserSession, ApiKey)
                .join(ApiKey, ApiKey.id == BrowserSession.api_key_id)
                .where(BrowserSession.token_hash == token_hash)
            )
        ).first()
        return None if row is None else (row[0], row[1])

    async def touch(self, session_id: str, when: datetime) -> None:
        await self.session.execute(
            update(BrowserSession).where(BrowserSession.id == session_id).values(last_used_at=when)
        )

    async def delete(self, token_hash: str) -> None:
        await self.session.execute(
            delete(BrowserSession).where(BrowserSession.token_hash == token_hash)
        )

    async def delete_ended(self, idle_before: datetime, now: datetime) -> int:
        """Removes the browser sessions idle since before `idle_before` or past their expiry."""
        result = await self.session.execute(
            delete(BrowserSession).where(
                (BrowserSession.last_used_at < idle_before) | (BrowserSession.expires_at <= now)
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)
