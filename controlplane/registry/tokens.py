"""Registration tokens: minted by (or for) a provider, spent by its daemons' RegisterHost."""

from __future__ import annotations

from datetime import timedelta

from controlplane.auth.principal import Principal
from controlplane.auth.repository import AuthRepository
from controlplane.auth.service import generate_secret, hash_secret
from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.errors import InvalidArgument, NotFound, PermissionDenied
from controlplane.idempotency import ensure_same
from controlplane.paging import Page, PageRequest
from controlplane.registry.models import RegistrationToken
from controlplane.registry.repository import RegistryRepository

TOKEN_PREFIX = "gpr_"
DEFAULT_TOKEN_TTL = timedelta(hours=24)
MAX_TOKEN_TTL = timedelta(days=365)
MAX_TOKEN_USES = 1_000_000  # stored as a signed 32-bit integer; 0 = unlimited


class RegistrationTokens:
    """Part of RegistryService: registration tokens."""

    db: Database
    self_service_providers: bool

    async def create_token(
        self,
        caller: Principal,
        provider_tenant_id: str,
        label: str,
        ttl_seconds: int,
        max_uses: int,
        idempotency_key: str | None,
        request_hash: str,
    ) -> tuple[RegistrationToken, str]:
        if not caller.is_admin and not self.self_service_providers:
            raise PermissionDenied(
                "registration tokens are minted by an admin for a provider tenant "
                "(self-service provider onboarding is off: GPUPLANE_SELF_SERVICE_PROVIDERS)"
            )
        provider = caller.require_tenant(provider_tenant_id)
        if provider == "platform" and caller.is_admin and not provider_tenant_id:
            raise InvalidArgument("provider_tenant_id", "name the provider the hosts belong to")
        ttl = timedelta(seconds=ttl_seconds) if ttl_seconds else DEFAULT_TOKEN_TTL
        if ttl > MAX_TOKEN_TTL:
            raise InvalidArgument("ttl_seconds", "at most 365 days")
        if len(label) > 200:
            raise InvalidArgument("label", "at most 200 characters")
        if max_uses > MAX_TOKEN_USES:
            raise InvalidArgument("max_uses", f"at most {MAX_TOKEN_USES} (0 = unlimited)")
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            if idempotency_key:
                existing = await repo.token_by_idempotency_key(caller.tenant_id, idempotency_key)
                if existing is not None:
                    ensure_same(existing.request_hash, request_hash, idempotency_key)
                    return existing, ""
            tenant = await AuthRepository(session).get_tenant(provider)
            if tenant is None:
                raise NotFound(f"provider_tenant_id: no tenant {provider!r}")
            if tenant.provider_revoked_at is not None and not caller.is_admin:
                raise PermissionDenied(
                    "provider_tenant_id: this provider has been revoked (RevokeProvider); only "
                    "an admin can mint its registration tokens"
                )
            secret = generate_secret(TOKEN_PREFIX)
            now = utcnow()
            token = RegistrationToken(
                id=new_id("rt"),
                provider_tenant_id=provider,
                label=label,
                secret_hash=hash_secret(secret),
                created_at=now,
                expires_at=now + ttl,
                max_uses=max_uses,
                uses=0,
                idempotency_key=idempotency_key,
                idempotency_tenant_id=caller.tenant_id if idempotency_key else None,
                request_hash=request_hash,
                self_service=not caller.is_admin,
            )
            repo.add(token)
            return token, secret

    async def list_tokens(
        self,
        caller: Principal,
        provider_tenant_id: str,
        include_inactive: bool,
        page: PageRequest,
    ) -> Page[RegistrationToken]:
        provider = (
            None
            if caller.is_admin and not provider_tenant_id
            else caller.require_tenant(provider_tenant_id)
        )
        async with self.db.read() as session:
            return await RegistryRepository(session).list_tokens(
                caller, provider, None if include_inactive else utcnow(), page
            )

    async def revoke_token(self, caller: Principal, token_id: str) -> RegistrationToken:
        async with self.db.transaction() as session:
            token = await RegistryRepository(session).get_readable_token(caller, token_id)
            if token is None:
                raise NotFound(f"token_id: no registration token {token_id!r}")
            if token.revoked_at is None:
                token.revoked_at = utcnow()
            return token
