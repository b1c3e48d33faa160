"""All SQL for tenants and API keys."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.models import ApiKey, Tenant
from controlplane.paging import Page, PageRequest, page_by_id


class AuthRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        return await self.session.get(Tenant, tenant_id)

    async def tenant_by_name(self, name: str) -> Tenant | None:
        return await self.session.scalar(select(Tenant).where(Tenant.name == name))

    async def tenant_by_idempotency_key(self, caller_tenant: str, key: str) -> Tenant | None:
        """The tenant created with `key` by a caller of `caller_tenant`."""
        return await self.session.scalar(
            select(Tenant).where(
                Tenant.idempotency_tenant_id == caller_tenant, Tenant.idempotency_key == key
            )
        )

    async def list_tenants(self, page: PageRequest) -> Page[Tenant]:
        return await page_by_id(self.session, select(Tenant), Tenant.id, page, lambda t: t.id)

    def add(self, row: Tenant | ApiKey) -> None:
        self.session.add(row)

    async def flush(self) -> None:
        await self.session.flush()

    async def key_by_hash(self, secret_hash: str) -> ApiKey | None:
        return await self.session.scalar(select(ApiKey).where(ApiKey.secret_hash == secret_hash))

    async def key_by_idempotency_key(self, caller_tenant: str, key: str) -> ApiKey | None:
        """The API key created with `key` by a caller of `caller_tenant`."""
        return await self.session.scalar(
            select(ApiKey).where(
                ApiKey.idempotency_tenant_id == caller_tenant, ApiKey.idempotency_key == key
            )
        )

    async def get_key(self, key_id: str) -> ApiKey | None:
        return await self.session.get(ApiKey, key_id)

    async def list_keys(
        self, tenant_id: str | None, include_revoked: bool, page: PageRequest
    ) -> Page[ApiKey]:
        query = select(ApiKey)
        if tenant_id:
            query = query.where(ApiKey.tenant_id == tenant_id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        return await page_by_id(self.session, query, ApiKey.id, page, lambda k: k.id)

    async def any_admin_key(self) -> bool:
        found = await self.session.scalar(
            select(ApiKey.id).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None)).limit(1)
        )
        return found is not None

    async def touch_key(self, key_id: str, when: datetime) -> None:
        await self.session.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=when)
        )
