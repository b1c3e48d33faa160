"""SQL for services' caller keys."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.services.models import ServiceKey


class ServiceKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, key: ServiceKey) -> None:
        self.session.add(key)

    async def of_service(self, service_id: str, include_revoked: bool) -> Sequence[ServiceKey]:
        query = select(ServiceKey).where(ServiceKey.service_id == service_id)
        if not include_revoked:
            query = query.where(ServiceKey.revoked_at.is_(None))
        query = query.order_by(ServiceKey.created_at.desc(), ServiceKey.id.desc()).limit(1000)
        return (await self.session.scalars(query)).all()

    async def get(self, service_id: str, key_id: str, *, lock: bool = False) -> ServiceKey | None:
        query = select(ServiceKey).where(
            ServiceKey.id == key_id, ServiceKey.service_id == service_id
        )
        if lock:
            query = query.with_for_update().execution_options(populate_existing=True)
        return await self.session.scalar(query)

    async def by_idempotency_key(self, service_id: str, key: str) -> ServiceKey | None:
        return await self.session.scalar(
            select(ServiceKey).where(
                ServiceKey.service_id == service_id, ServiceKey.idempotency_key == key
            )
        )

    async def live_count(self, service_id: str) -> int:
        query = select(func.count()).where(
            ServiceKey.service_id == service_id, ServiceKey.revoked_at.is_(None)
        )
        return int(await self.session.scalar(query) or 0)

    async def live_hashes(self, service_ids: Sequence[str] | None) -> list[tuple[str, str, str]]:
        """(service id, key id, secret hash) of the keys not revoked, of `service_ids` (None:
        of every service): what the gateway's routing table holds."""
        query = select(ServiceKey.service_id, ServiceKey.id, ServiceKey.secret_hash).where(
            ServiceKey.revoked_at.is_(None)
        )
        if service_ids is not None:
            query = query.where(ServiceKey.service_id.in_(service_ids))
        return [(s, k, h) for s, k, h in (await self.session.execute(query)).all()]
