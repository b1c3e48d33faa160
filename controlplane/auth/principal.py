"""Who is calling: the principal an authenticated credential acts as."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from enum import StrEnum

from controlplane.errors import PermissionDenied, Unauthenticated


class Role(StrEnum):
    ADMIN = "admin"
    CONSUMER = "consumer"
    PROVIDER = "provider"
    HOST = "host"


@dataclass(frozen=True, slots=True)
class Principal:
    tenant_id: str
    role: Role
    # The API key id, or the host id for a host credential.
    principal_id: str

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def require_tenant(self, tenant_id: str) -> str:
        """The tenant the caller may act on: its own, or any for an admin."""
        if not tenant_id or tenant_id == self.tenant_id:
            return self.tenant_id
        if self.is_admin:
            return tenant_id
        raise PermissionDenied("tenant_id: you may only act on your own tenant")


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "gpuplane_principal", default=None
)


def current_principal() -> Principal:
    """The principal of the RPC being served (set by the auth interceptor)."""
    principal = _current.get()
    if principal is None:
        raise Unauthenticated("this method needs a credential")
    return principal


def set_current_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _current.set(principal)
