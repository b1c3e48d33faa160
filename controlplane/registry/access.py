"""A host's credentials end to end: registration (and the NATS account push it may need) and
RevokeHost's (and RevokeProvider's) sequence: the registry's rows, the API-key cache, the
hosts' live attempts, the NATS account."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from gpuplane.v1 import registry_pb2

from controlplane.auth.principal import Principal, Role
from controlplane.errors import Unavailable
from controlplane.registry.models import Gpu, Host
from controlplane.registry.service import HostRegistration, RegistryService

log = logging.getLogger(__name__)


def as_host(host: Host) -> Principal:
    """The principal of `host` itself (RegisterHost runs without a key)."""
    return Principal(tenant_id=host.provider_tenant_id, role=Role.HOST, principal_id=host.id)


class HostAccess:
    def __init__(
        self,
        registry: RegistryService,
        sweep_lost_attempts: Callable[[], Awaitable[object]],
        forget_principal: Callable[[str], None] | None = None,
        remember_credential: Callable[[str, Principal], None] | None = None,
    ) -> None:
        self.registry = registry
        # Ends the live attempts of lost hosts (JobService.sweep_lost_attempts).
        self.sweep_lost_attempts = sweep_lost_attempts
        # Drops a principal from the API-key cache (AuthService.forget) once it is revoked.
        self.forget_principal = forget_principal
        # Caches a credential issued here (AuthService.remember): the daemon's Connect, which
        # follows at once, then costs no credential lookup.
        self.remember_credential = remember_credential

    async def register(
        self, request: registry_pb2.RegisterHostRequest
    ) -> tuple[HostRegistration, Sequence[Gpu]]:
        """RegisterHost: the host, its new credentials, and its GPUs as stored."""
        async with self.registry.connecting:  # a fleet registering at once waits parked
            registration = await self.registry.register_host(request)
        host = registration.host
        if registration.revoked_nats_user:
            await self.push_account("re-registration revoked the host's earlier NATS user")
        if self.remember_credential is not None:
            self.remember_credential(registration.credential, as_host(host))
        return registration, registration.gpus

    async def revoke(
        self, caller: Principal, host_id: str, reason: str
    ) -> tuple[Host, Sequence[Gpu]]:
        """RevokeHost: stores the revocation, forgets the credential, loses the host's running
        attempts now (not at the next liveness tick) and pushes the NATS account. Idempotent:
        a retry after UNAVAILABLE pushes again."""
        host = await self.registry.revoke_host(host_id, reason)
        if self.forget_principal is not None:
            self.forget_principal(host.id)
        await self.sweep_lost_attempts()
        if host.nats_user_key:
            await self.push_account(f"host {host.id} revoked", required=True)
        _, gpus = await self.registry.get_host(caller, host.id)
        return host, gpus

    async def revoke_provider(self, provider: str, reason: str) -> tuple[Sequence[Host], int]:
        """RevokeProvider: RevokeHost's sequence for every host of the provider at once (one
        sweep, one NATS account push); its active registration tokens are revoked too."""
        hosts, tokens = await self.registry.revoke_provider(provider, reason)
        if self.forget_principal is not None:
            for host in hosts:
                self.forget_principal(host.id)
        await self.sweep_lost_attempts()
        if any(h.nats_user_key for h in hosts):
            await self.push_account(f"provider {provider} revoked", required=True)
        return hosts, tokens

    async def push_account(self, why: str, *, required: bool = False) -> None:
        """Pushes the account JWT. Required (RevokeHost): Unavailable when NATS did not take
        it; the revocation is committed, so retrying the RPC pushes again."""
        nats_auth = self.registry.nats_auth
        if nats_auth is None:
            return
        try:
            await nats_auth.push_account()
        except Unavailable as error:
            log.warning("NATS account update (%s) failed: %s", why, error.message)
            if required:
                raise Unavailable(
                    f"the revocation is stored but NATS has not taken it yet ({error.message}); "
                    "call RevokeHost again to retry (control planes also push it at start)"
                ) from None
