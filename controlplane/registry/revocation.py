"""Revocation: one host (RevokeHost) or every host and registration token of a provider
(RevokeProvider), in the registry's rows and this process's connections."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from controlplane.auth.repository import AuthRepository
from controlplane.auth.service import generate_secret, hash_secret
from controlplane.commands.repository import CommandRepository
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import InvalidArgument, NotFound
from controlplane.registry.models import Host
from controlplane.registry.monitor import GpuMonitor
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.states import HostState, set_host_state
from controlplane.registry.streams import HostStreams


class Revocations:
    """Part of RegistryService: revoking hosts, one or a provider's all."""

    db: Database
    streams: HostStreams
    monitor: GpuMonitor | None
    _up: set[str]
    _heard: set[str]

    async def revoke_host(self, host_id: str, reason: str) -> Host:
        """RevokeHost (admin): the credential stops matching, the NATS user joins the
        account's revocations, the host is lost for good (its live attempts are then lost
        like any lost host's) and its Connect stream here ends. Idempotent."""
        _check_reason(reason)
        now = utcnow()
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            host = await repo.get_host(host_id, lock=True)
            if host is None:
                raise NotFound(f"host_id: no host {host_id!r}")
            await _revoke(repo, host, f"RevokeHost: {reason or 'revoked'}", reason, now)
        self._forget([host_id])
        return host

    async def revoke_provider(self, provider: str, reason: str) -> tuple[Sequence[Host], int]:
        """RevokeProvider (admin): every host of the provider is revoked as RevokeHost revokes
        one (lost ones and those that never connected included), and its registration tokens
        still active are revoked, so none of its machines can register again until an admin
        mints it a new token (it can no longer mint its own, even with self-service on).
        Returns its hosts and how many tokens were revoked. Idempotent."""
        _check_reason(reason)
        if not provider:
            raise InvalidArgument("provider_tenant_id", "is required")
        now = utcnow()
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            tenant = await AuthRepository(session).get_tenant(provider)
            if tenant is None:
                raise NotFound(f"provider_tenant_id: no tenant {provider!r}")
            tenant.provider_revoked_at = tenant.provider_revoked_at or now
            hosts = await repo.hosts_of_provider(provider, lock=True)
            why = f"RevokeProvider: {reason or 'provider revoked'}"
            for host in hosts:
                await _revoke(repo, host, why, reason or "provider revoked", now)
            tokens = await repo.revoke_tokens_of(provider, now)
        self._forget([h.id for h in hosts])
        return hosts, tokens

    def _forget(self, host_ids: Sequence[str]) -> None:
        """Ends what this process keeps of revoked hosts: liveness, telemetry, streams."""
        self._up.difference_update(host_ids)
        self._heard.difference_update(host_ids)
        if self.monitor is not None:
            self.monitor.forget(list(host_ids))
        for host_id in host_ids:
            self.streams.revoke(host_id)


def _check_reason(reason: str) -> None:
    if len(reason) > 500:
        raise InvalidArgument("reason", "at most 500 characters")


async def _revoke(
    repo: RegistryRepository, host: Host, why: str, reason: str, now: datetime
) -> None:
    """Revokes one host in the open transaction (once; a revoked host keeps its first
    revocation) and adds its NATS user to the account's revocations."""
    if host.revoked_at is None:
        host.revoked_at = now
        host.revoked_reason = reason or "revoked"
        # A hash no secret has: the old credential matches nothing from now on.
        host.credential_hash = hash_secret(generate_secret("revoked_"))
        set_host_state(repo, host, HostState.LOST, why, now)
        # It never connects again: nothing stored for it will be delivered.
        await CommandRepository(repo.session).close_host(host.id, now)
    if host.nats_user_key:
        await repo.revoke_nats_user(host.nats_user_key, host.id, host.revoked_at)
