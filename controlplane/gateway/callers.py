"""Who calls the gateway: a tenant's API key (cached) or a service's caller key (in memory)."""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.auth.principal import Principal, Role
from controlplane.auth.service import AuthService, hash_secret
from controlplane.errors import DomainError
from controlplane.gateway.routes import Route, RouteTable
from controlplane.services.keys import SERVICE_KEY_PREFIX


@dataclass(frozen=True, slots=True)
class Caller:
    # Whose services it reaches by name, and who the replica's tunnel is opened as.
    principal: Principal
    # A caller key's service: the only one it reaches ("" for an API key).
    service_id: str = ""

    def route(self, routes: RouteTable, ref: str) -> Route | None:
        """The service `ref` (a name among the caller's tenant's, or an id) if the caller
        reaches it: a caller key its own service only; an API key its tenant's (an admin's
        any, by id). Anything else is None: 404, as a missing one."""
        tenant = self.principal.tenant_id
        found = routes.get(ref) if ref.startswith("svc_") else routes.named(tenant, ref)
        if found is None:
            return None
        if self.service_id:
            return found if found.service_id == self.service_id else None
        return found if found.tenant_id == tenant or self.principal.is_admin else None


class Callers:
    """Authenticates a bearer secret without a database read per request. A caller key
    (`gsk_…`) is looked up in the routing table, which holds each service's keys not revoked
    and follows the control plane's change stream (a revocation reaches it like any route
    change). An API key goes through AuthService.authenticate, whose cache re-checks a key
    after `GPUPLANE_AUTH_CACHE_TTL_SECONDS` (5): the bound on a key revoked on another
    replica (this replica's revocations drop it at once). Host credentials are no callers."""

    def __init__(self, auth: AuthService, routes: RouteTable) -> None:
        self.auth = auth
        self.routes = routes

    async def identify(self, secret: str) -> Caller | None:
        if secret.startswith(SERVICE_KEY_PREFIX):
            digest = hash_secret(secret)
            route = self.routes.keyed(digest)
            if route is None:
                return None
            key_id = route.keys[digest]
            return Caller(Principal(route.tenant_id, Role.CONSUMER, key_id), route.service_id)
        try:
            principal = await self.auth.authenticate(secret)
        except DomainError:
            return None
        if principal.role is Role.HOST:
            return None
        return Caller(principal)
