"""All SQL of input records; every statement is scoped to one tenant."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.data.models import InputRecord
from controlplane.paging import Page, PageRequest, page_by_id


class InputRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def record(
        self, tenant_id: str, key: str, size_bytes: int, sha256: str, now: datetime
    ) -> InputRecord:
        """Creates or replaces the record of `key` (an upload to a key overwrites it)."""
        row = await self.session.get(InputRecord, (tenant_id, key))
        if row is None:
            row = InputRecord(tenant_id=tenant_id, key=key)
            self.session.add(row)
        row.size_bytes, row.sha256, row.uploaded_at = size_bytes, sha256, now
        await self.session.flush()
        return row

    async def list(self, tenant_id: str, prefix: str, page: PageRequest) -> Page[InputRecord]:
        """The tenant's records in key order, those starting with `prefix`."""
        query = select(InputRecord).where(InputRecord.tenant_id == tenant_id)
        if prefix:
            # Escaped: keys may hold % and _.
            query = query.where(InputRecord.key.startswith(prefix, autoescape=True))
        return await page_by_id(self.session, query, InputRecord.key, page, lambda row: row.key)

    async def forget(self, tenant_id: str, key: str) -> bool:
        """Deletes the record; whether there was one."""
        result = await self.session.execute(
            delete(InputRecord).where(InputRecord.tenant_id == tenant_id, InputRecord.key == key)
        )
        return bool(getattr(result, "rowcount", 0))

    async def hashes(self, tenant_id: str, keys: Collection[str]) -> dict[str, str]:
        """key → recorded SHA-256, for those of `keys` that have a record."""
        if not keys:
            return {}
        rows = await self.session.execute(
            select(InputRecord.key, InputRecord.sha256).where(
                InputRecord.tenant_id == tenant_id, InputRecord.key.in_(list(keys))
            )
        )
        return {str(key): str(sha) for key, sha in rows}
