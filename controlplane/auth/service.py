"""Tenants and API keys: creation, listing, revocation, and authenticating a bearer secret."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.models import ApiKey, Tenant
from controlplane.auth.principal import Principal, Role
from controlplane.auth.repository import AuthRepository
from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from controlplane.idempotency import ensure_same
from controlplane.paging import Page, PageRequest

log = logging.getLogger(__name__)

API_KEY_PREFIX = "gpk_"
PLATFORM_TENANT = "platform"
# pg_advisory_xact_lock key of the bootstrap ("gpub"): see AuthService._lock_bootstrap.
BOOTSTRAP_LOCK = 0x67707562
MAX_NAME_LENGTH = 200
# last_used_at is kept to this resolution, so authentication rarely writes.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_secret(secret: str) -> str:
    """Secrets carry 256 random bits, so one SHA-256 is enough (no salt or stretching)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def generate_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    # Empty when an idempotent replay returned an existing key: the secret is shown once.
    secret: str


class AuthService:
    """Owns tenants and API keys. Verified keys are cached for `cache_ttl` seconds, which
    bounds how long a revoked key keeps working on another replica."""

    def __init__(
        self,
        db: Database,
        cache_ttl: float = 5.0,
        fallback: Callable[[str], Awaitable[Principal | None]] | None = None,
        fallback_prefix: str = "",
    ) -> None:
        self.db = db
        self.cache_ttl = cache_ttl
        # Other credentials (host credentials) are checked here when no API key matches;
        # those starting with `fallback_prefix` (never an API key's) are checked there only.
        self.fallback = fallback
        self.fallback_prefix = fallback_prefix
        self._cache: dict[str, tuple[Principal, float, datetime | None]] = {}
        # The cached digest of each fallback principal (a host has one credential at a time:
        # caching its new one drops the one it replaced).
        self._fallback_digests: dict[str, str] = {}
        # Lookups under way, by digest: callers that miss the cache together share one
        # (at each TTL expiry every in-flight call missed at once, each reading the database).
        self._lookups: dict[str, asyncio.Future[Principal]] = {}
        # Bumped by `forget`: a lookup that began before a revocation answers its callers but
        # does not cache its (possibly stale) verdict.
        self._generation = 0
        # Told each key id revoked here (the other replicas' caches hear of it: gateway.watch).
        self.revoked_listeners: list[Callable[[str], None]] = []

    async def authenticate(self, secret: str) -> Principal:
        """The principal of an API key secret, or UNAUTHENTICATED. Callers that miss the
        cache for the same secret at the same time wait for one lookup."""
        digest = hash_secret(secret)
        cached = self._cache.get(digest)
        if cached is not None:
            principal, checked_at, expires_at = cached
            if time.monotonic() - checked_at < self.cache_ttl and (
                expires_at is None or expires_at > utcnow()
            ):
                return principal
            del self._cache[digest]
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up(secret, digest))
            self._lookups[digest] = lookup
            lookup.add_done_callback(functools.partial(self._looked_up, digest))
        # One caller going away (a cancelled call) does not cancel the others' lookup.
        return await asyncio.shield(lookup)

    def _looked_up(self, digest: str, lookup: asyncio.Future[Principal]) -> None:
        if self._lookups.get(digest) is lookup:
            del self._lookups[digest]
        if not lookup.cancelled():
            lookup.exception()  # retrieved: every caller may have gone away

    async def _look_up(self, secret: str, digest: str) -> Principal:
        now_mono = time.monotonic()
        generation = self._generation
        key = None
        if not (self.fallback_prefix and secret.startswith(self.fallback_prefix)):
            async with self.db.read() as session:
                key = await AuthRepository(session).key_by_hash(digest)
        now = utcnow()
        if key is None and self.fallback is not None:
            other = await self.fallback(secret)
            if other is not None:
                if generation == self._generation:
                    self._cache_fallback(digest, other)
                return other
        if key is None or key.revoked_at is not None:
            raise Unauthenticated("the API key is not valid (unknown or revoked)")
        if key.expires_at is not None and key.expires_at <= now:
            raise Unauthenticated("the API key has expired")
        if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
            async with self.db.transaction() as session:
                await AuthRepository(session).touch_key(key.id, now)
        principal = Principal(tenant_id=key.tenant_id, role=Role(key.role), principal_id=key.id)
        if generation == self._generation:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (principal, now_mono, key.expires_at)
        return principal

    def remember(self, secret: str, principal: Principal) -> None:
        """Caches a credential issued by this process (a host's, at RegisterHost) for the
        cache's TTL, as a lookup would have; the principal's earlier credential (that the
        new one replaced) is no longer cached."""
        self._cache_fallback(hash_secret(secret), principal)

    def _cache_fallback(self, digest: str, principal: Principal) -> None:
        if len(self._cache) > 100_000:
            self._cache.clear()
            self._fallback_digests.clear()
        earlier = self._fallback_digests.get(principal.principal_id)
        if earlier is not None and earlier != digest:
            self._cache.pop(earlier, None)
        self._fallback_digests[principal.principal_id] = digest
        self._cache[digest] = (principal, time.monotonic(), None)

    def forget(self, key_id: str) -> None:
        """Drops a key from this process's cache (after revocation); lookups under way
        do not cache what they find, and later callers do not join them."""
        self._generation += 1
        self._lookups.clear()
        self._fallback_digests.pop(key_id, None)
        for digest, (principal, _, _) in list(self._cache.items()):
            if principal.principal_id == key_id:
                del self._cache[digest]

    async def create_tenant(
        self,
        caller: Principal,
        name: str,
        weight: int,
        idempotency_key: str | None,
        request_hash: str,
    ) -> Tenant:
        """A new tenant; `idempotency_key` is the caller's, scoped to its tenant."""
        name = name.strip()
        if not name:
            raise InvalidArgument("name", "must not be empty")
        if len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise InvalidArgument("name", f"must be printable and at most {MAX_NAME_LENGTH} chars")
        try:
            async with self.db.transaction() as session:
                repo = AuthRepository(session)
                if idempotency_key:
                    existing = await repo.tenant_by_idempotency_key(
                        caller.tenant_id, idempotency_key
                    )
                    if existing is not None:
                        ensure_same(existing.request_hash, request_hash, idempotency_key)
                        return existing
                if await repo.tenant_by_name(name) is not None:
                    raise AlreadyExists(f"name: a tenant named {name!r} already exists")
                tenant = Tenant(
                    id=new_id("ten"),
                    name=name,
                    fair_share_weight=max(weight, 1),
                    created_at=utcnow(),
                    idempotency_key=idempotency_key,
                    idempotency_tenant_id=caller.tenant_id if idempotency_key else None,
                    request_hash=request_hash,
                )
                repo.add(tenant)
                return tenant
        except IntegrityError:
            # A concurrent request with the same key or name won; replay or report it.
            if idempotency_key:
                async with self.db.read() as session:
                    existing = await AuthRepository(session).tenant_by_idempotency_key(
                        caller.tenant_id, idempotency_key
                    )
                if existing is not None:
                    ensure_same(existing.request_hash, request_hash, idempotency_key)
                    return existing
            raise AlreadyExists(f"name: a tenant named {name!r} already exists") from None

    async def list_tenants(self, page: PageRequest) -> Page[Tenant]:
        async with self.db.read() as session:
            return await AuthRepository(session).list_tenants(page)

    async def create_api_key(
        self,
        caller: Principal,
        tenant_id: str,
        role: Role,
        description: str,
        expires_at: datetime | None,
        idempotency_key: str | None,
        request_hash: str,
    ) -> CreatedKey:
        if role is Role.HOST:
            raise InvalidArgument("role", "host credentials are issued by RegisterHost")
        if len(description) > 500:
            raise InvalidArgument("description", "longer than 500 characters")
        if expires_at is not None and expires_at <= utcnow():
            raise InvalidArgument("expires_at", "is in the past")
        async with self.db.transaction() as session:
            repo = AuthRepository(session)
            if idempotency_key:
                existing = await repo.key_by_idempotency_key(caller.tenant_id, idempotency_key)
                if existing is not None:
                    ensure_same(existing.request_hash, request_hash, idempotency_key)
                    return CreatedKey(existing, "")
            if await repo.get_tenant(tenant_id) is None:
                raise NotFound(f"tenant_id: no tenant {tenant_id!r}")
            secret = generate_secret(API_KEY_PREFIX)
            key = ApiKey(
                id=new_id("key"),
                tenant_id=tenant_id,
                role=role.value,
                description=description,
                prefix=secret[:10],
                secret_hash=hash_secret(secret),
                created_at=utcnow(),
                expires_at=expires_at,
                idempotency_key=idempotency_key,
                idempotency_tenant_id=caller.tenant_id if idempotency_key else None,
                request_hash=request_hash,
            )
            repo.add(key)
            return CreatedKey(key, secret)

    async def list_api_keys(
        self, tenant_id: str | None, include_revoked: bool, page: PageRequest
    ) -> Page[ApiKey]:
        async with self.db.read() as session:
            return await AuthRepository(session).list_keys(tenant_id, include_revoked, page)

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        async with self.db.transaction() as session:
            key = await AuthRepository(session).get_key(key_id)
            if key is None:
                raise NotFound(f"key_id: no API key {key_id!r}")
            if key.revoked_at is None:
                key.revoked_at = utcnow()
        self.forget(key_id)
        for listener in self.revoked_listeners:
            listener(key_id)
        return key

    async def _lock_bootstrap(self, session: AsyncSession) -> None:
        """Serialises the bootstrap of replicas starting at once on one fresh PostgreSQL
        database (a transaction-level advisory lock); SQLite has one writer anyway."""
        if not self.db.sqlite:
            await session.execute(text(f"SELECT pg_advisory_xact_lock({BOOTSTRAP_LOCK})"))

    async def _platform_tenant(self, session: AsyncSession) -> Tenant:
        repo = AuthRepository(session)
        tenant = await repo.get_tenant(PLATFORM_TENANT)
        if tenant is None:
            tenant = Tenant(id=PLATFORM_TENANT, name=PLATFORM_TENANT, created_at=utcnow())
            repo.add(tenant)
            await session.flush()
        return tenant

    async def ensure_platform_tenant(self) -> Tenant:
        async def work(session: AsyncSession) -> Tenant:
            await self._lock_bootstrap(session)
            return await self._platform_tenant(session)

        return await self.db.run(work)

    async def ensure_bootstrap_admin(self, configured: str | None, data_dir: Path) -> Path | None:
        """Makes sure an admin can log in: accepts the configured key (stored hashed), or, when
        no admin key exists yet, generates one and writes it once to data_dir/admin.key.
        Replicas starting together on a fresh database take turns: one creates, the others
        find what it created."""
        key_file = data_dir / "admin.key"

        async def work(session: AsyncSession) -> Path | None:
            await self._lock_bootstrap(session)
            await self._platform_tenant(session)
            repo = AuthRepository(session)
            if configured:
                if await repo.key_by_hash(hash_secret(configured)) is None:
                    repo.add(
                        ApiKey(
                            id=new_id("key"),
                            tenant_id=PLATFORM_TENANT,
                            role=Role.ADMIN.value,
                            description="bootstrap admin key (from settings)",
                            prefix=configured[:10],
                            secret_hash=hash_secret(configured),
                            created_at=utcnow(),
                        )
                    )
                return None
            if await repo.any_admin_key():
                return None
            secret = generate_secret(API_KEY_PREFIX)
            repo.add(
                ApiKey(
                    id=new_id("key"),
                    tenant_id=PLATFORM_TENANT,
                    role=Role.ADMIN.value,
                    description="bootstrap admin key (generated)",
                    prefix=secret[:10],
                    secret_hash=hash_secret(secret),
                    created_at=utcnow(),
                )
            )
            await session.flush()
            # Written before the commit: a key file never names a key that was not stored
            # by a committed transaction, except when the commit itself fails (then the
            # next start generates a new one and overwrites it).
            data_dir.mkdir(parents=True, exist_ok=True)
            key_file.touch(mode=0o600)
            key_file.chmod(0o600)
            key_file.write_text(secret + "\n")
            return key_file

        written = await self.db.run(work)
        if written is not None:
            log.info("generated a bootstrap admin key; it is in %s", written)
        return written
