"""Services' caller keys: created (the secret shown once, stored hashed), listed and revoked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.auth.service import generate_secret, hash_secret
from controlplane.db.base import new_id, utcnow
from controlplane.errors import FailedPrecondition, InvalidArgument, NotFound
from controlplane.idempotency import ensure_same
from controlplane.services.keys_repository import ServiceKeyRepository
from controlplane.services.models import Service, ServiceKey
from controlplane.services.repository import ServiceRepository
from controlplane.services.service import ServiceService
from controlplane.services.states import ServiceState, note_service_event

SERVICE_KEY_PREFIX = "gsk_"
KEY_ID_PREFIX = "skey"
MAX_DESCRIPTION = 500
# Keys not revoked that one service may have at once.
MAX_LIVE_KEYS = 100


@dataclass(frozen=True, slots=True)
class CreatedServiceKey:
    key: ServiceKey
    # The bearer secret: shown once, never stored.
    secret: str


def _missing(ref: str) -> NotFound:
    return NotFound(f"service: no service {ref[:63]!r}")


class ServiceKeys:
    """A service's caller keys. Each change is a service event, and the gateways' routing
    tables hear of it (ServiceService.touched), so a revoked key stops working there within
    their change stream's delay."""

    def __init__(self, services: ServiceService) -> None:
        self.services = services
        self.db = services.jobs.db

    async def create(
        self,
        caller: Principal,
        ref: str,
        description: str,
        idempotency_key: str | None = None,
        request_hash: str = "",
    ) -> CreatedServiceKey:
        """A new caller key of the service; a replay of `idempotency_key` (per service) returns
        the key it made, without its secret (shown once)."""
        if len(description) > MAX_DESCRIPTION or not description.isprintable():
            raise InvalidArgument(
                "description", f"must be printable and at most {MAX_DESCRIPTION} characters"
            )
        secret = generate_secret(SERVICE_KEY_PREFIX)

        async def work(session: AsyncSession) -> CreatedServiceKey:
            service = await self._service(session, caller, ref, lock=True)
            keys = ServiceKeyRepository(session)
            if idempotency_key:
                existing = await keys.by_idempotency_key(service.id, idempotency_key)
                if existing is not None:
                    ensure_same(existing.request_hash, request_hash, idempotency_key)
                    return CreatedServiceKey(existing, "")
            if service.state == ServiceState.DELETED.value:
                raise NotFound(f"service: {ref[:63]!r} was deleted")
            if await keys.live_count(service.id) >= MAX_LIVE_KEYS:
                raise FailedPrecondition(
                    f"service: {service.name!r} has {MAX_LIVE_KEYS} keys; revoke one first"
                )
            now = utcnow()
            key = ServiceKey(
                id=new_id(KEY_ID_PREFIX),
                service_id=service.id,
                description=description,
                prefix=secret[:10],
                secret_hash=hash_secret(secret),
                created_at=now,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            keys.add(key)
            note_service_event(
                ServiceRepository(session), service, f"caller key {key.id} created", now
            )
            return CreatedServiceKey(key, secret)

        created = await self.db.run(work)
        if created.secret:
            self.services.touched(created.key.service_id)
        return created

    async def list_keys(
        self, caller: Principal, ref: str, include_revoked: bool
    ) -> Sequence[ServiceKey]:
        async with self.db.read() as session:
            service = await self._service(session, caller, ref)
            return await ServiceKeyRepository(session).of_service(service.id, include_revoked)

    async def revoke(self, caller: Principal, ref: str, key_id: str) -> ServiceKey:
        """Revokes the key (revoking it again returns it as it is)."""
        if not key_id:
            raise InvalidArgument("key_id", "is required")

        async def work(session: AsyncSession) -> ServiceKey:
            service = await self._service(session, caller, ref, lock=True)
            key = await ServiceKeyRepository(session).get(service.id, key_id, lock=True)
            if key is None:
                raise NotFound(f"key_id: service {service.name!r} has no key {key_id[:60]!r}")
            if key.revoked_at is None:
                now = utcnow()
                key.revoked_at = now
                repo = ServiceRepository(session)
                note_service_event(repo, service, f"caller key {key.id} revoked", now)
            return key

        key = await self.db.run(work)
        self.services.touched(key.service_id)
        return key

    @staticmethod
    async def _service(
        session: AsyncSession, caller: Principal, ref: str, *, lock: bool = False
    ) -> Service:
        if not ref:
            raise InvalidArgument("service", "is required (its id or name)")
        service = await ServiceRepository(session).find(caller, ref, lock=lock)
        if service is None:
            raise _missing(ref)
        return service
