"""AdminService: tenants, API keys, registration tokens, pricing policy, fleet status."""

from __future__ import annotations

from typing import Any

from gpuplane.v1 import admin_pb2, admin_pb2_grpc, types_pb2

from controlplane.api.convert import ROLE_TO_PB, from_timestamp, role_from_pb, timestamp
from controlplane.auth.models import ApiKey, Tenant
from controlplane.auth.principal import Role, current_principal
from controlplane.auth.service import AuthService
from controlplane.errors import InvalidArgument
from controlplane.fleet import Fleet, FleetStatus
from controlplane.idempotency import check_key, fingerprint
from controlplane.jobs.states import JobState
from controlplane.ledger.fees import PlatformFees
from controlplane.paging import PageRequest
from controlplane.registry.models import RegistrationToken
from controlplane.registry.service import RegistryService
from controlplane.settings_groups import PricingSettings

Context = Any
# What SetPricingPolicy cannot change: the hosts' price bounds and the minimum payout.
FIXED_FIELDS = (
    "min_price_per_gpu_hour_micro_credits",
    "max_price_per_gpu_hour_micro_credits",
    "min_payout_micro_credits",
)


def tenant_pb(row: Tenant) -> types_pb2.Tenant:
    return types_pb2.Tenant(
        tenant_id=row.id,
        name=row.name,
        created_at=timestamp(row.created_at),
        fair_share_weight=row.fair_share_weight,
    )


def api_key_pb(row: ApiKey) -> types_pb2.ApiKey:
    return types_pb2.ApiKey(
        key_id=row.id,
        tenant_id=row.tenant_id,
        role=ROLE_TO_PB[Role(row.role)],
        description=row.description,
        prefix=row.prefix,
        created_at=timestamp(row.created_at),
        expires_at=timestamp(row.expires_at),
        revoked_at=timestamp(row.revoked_at),
        last_used_at=timestamp(row.last_used_at),
    )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        auth: AuthService,
        registry: RegistryService,
        pricing: types_pb2.PricingPolicy,
        fees: PlatformFees,
        fleet: Fleet,
    ) -> None:
        self.auth = auth
        self.fleet = fleet
        self.registry = registry
        # The settings' policy; its fee until an operator sets one (`fees`).
        self.pricing = pricing
        self.fees = fees

    def _policy(self, fee: int | None) -> types_pb2.PricingPolicy:
        policy = types_pb2.PricingPolicy()
        policy.CopyFrom(self.pricing)
        if fee is not None:
            policy.platform_fee_basis_points = fee
        return policy

    async def WhoAmI(
        self, request: admin_pb2.WhoAmIRequest, context: Context
    ) -> admin_pb2.WhoAmIResponse:
        principal = current_principal()
        return admin_pb2.WhoAmIResponse(
            tenant_id=principal.tenant_id,
            role=ROLE_TO_PB[principal.role],
            principal_id=principal.principal_id,
        )

    async def CreateTenant(
        self, request: admin_pb2.CreateTenantRequest, context: Context
    ) -> admin_pb2.CreateTenantResponse:
        tenant = await self.auth.create_tenant(
            current_principal(),
            request.name,
            request.fair_share_weight,
            check_key(request.idempotency_key),
            fingerprint(request),
        )
        return admin_pb2.CreateTenantResponse(tenant=tenant_pb(tenant))

    async def ListTenants(
        self, request: admin_pb2.ListTenantsRequest, context: Context
    ) -> admin_pb2.ListTenantsResponse:
        page = await self.auth.list_tenants(PageRequest(request.page_token, request.page_size))
        return admin_pb2.ListTenantsResponse(
            tenants=[tenant_pb(r) for r in page.items], next_page_token=page.next_cursor
        )

    async def CreateApiKey(
        self, request: admin_pb2.CreateApiKeyRequest, context: Context
    ) -> admin_pb2.CreateApiKeyResponse:
        created = await self.auth.create_api_key(
            current_principal(),
            request.tenant_id,
            role_from_pb(request.role),
            request.description,
            from_timestamp(request, "expires_at"),
            check_key(request.idempotency_key),
            fingerprint(request),
        )
        return admin_pb2.CreateApiKeyResponse(key=api_key_pb(created.key), secret=created.secret)

    async def ListApiKeys(
        self, request: admin_pb2.ListApiKeysRequest, context: Context
    ) -> admin_pb2.ListApiKeysResponse:
        page = await self.auth.list_api_keys(
            request.tenant_id or None,
            request.include_revoked,
            PageRequest(request.page_token, request.page_size),
        )
        return admin_pb2.ListApiKeysResponse(
            keys=[api_key_pb(r) for r in page.items], next_page_token=page.next_cursor
        )

    async def RevokeApiKey(
        self, request: admin_pb2.RevokeApiKeyRequest, context: Context
    ) -> admin_pb2.RevokeApiKeyResponse:
        key = await self.auth.revoke_api_key(request.key_id)
        return admin_pb2.RevokeApiKeyResponse(key=api_key_pb(key))

    async def CreateRegistrationToken(
        self, request: admin_pb2.CreateRegistrationTokenRequest, context: Context
    ) -> admin_pb2.CreateRegistrationTokenResponse:
        token, secret = await self.registry.create_token(
            current_principal(),
            request.provider_tenant_id,
            request.label,
            request.ttl_seconds,
            request.max_uses,
            check_key(request.idempotency_key),
            fingerprint(request),
        )
        return admin_pb2.CreateRegistrationTokenResponse(token=token_pb(token), secret=secret)

    async def ListRegistrationTokens(
        self, request: admin_pb2.ListRegistrationTokensRequest, context: Context
    ) -> admin_pb2.ListRegistrationTokensResponse:
        page = await self.registry.list_tokens(
            current_principal(),
            request.provider_tenant_id,
            request.include_inactive,
            PageRequest(request.page_token, request.page_size),
        )
        return admin_pb2.ListRegistrationTokensResponse(
            tokens=[token_pb(r) for r in page.items], next_page_token=page.next_cursor
        )

    async def RevokeRegistrationToken(
        self, request: admin_pb2.RevokeRegistrationTokenRequest, context: Context
    ) -> admin_pb2.RevokeRegistrationTokenResponse:
        token = await self.registry.revoke_token(current_principal(), request.token_id)
        return admin_pb2.RevokeRegistrationTokenResponse(token=token_pb(token))

    async def GetPricingPolicy(
        self, request: admin_pb2.GetPricingPolicyRequest, context: Context
    ) -> admin_pb2.GetPricingPolicyResponse:
        return admin_pb2.GetPricingPolicyResponse(policy=self._policy(await self.fees.read()))

    async def SetPricingPolicy(
        self, request: admin_pb2.SetPricingPolicyRequest, context: Context
    ) -> admin_pb2.SetPricingPolicyResponse:
        """Sets the platform fee; the price bounds and the minimum payout come from settings
        (0 or their current value: unchanged)."""
        wanted = request.policy
        if not request.HasField("policy"):
            raise InvalidArgument("policy", "is required")
        for name in FIXED_FIELDS:
            value = getattr(wanted, name)
            if value not in (0, getattr(self.pricing, name)):
                raise InvalidArgument(
                    f"policy.{name}", "is set in the settings and cannot change at run time"
                )
        fee = await self.fees.set(wanted.platform_fee_basis_points)
        return admin_pb2.SetPricingPolicyResponse(policy=self._policy(fee))

    async def GetFleetStatus(
        self, request: admin_pb2.GetFleetStatusRequest, context: Context
    ) -> admin_pb2.GetFleetStatusResponse:
        return fleet_pb(await self.fleet.status())


def pricing_policy(group: PricingSettings) -> types_pb2.PricingPolicy:
    """The pricing policy AdminService states."""
    return types_pb2.PricingPolicy(
        platform_fee_basis_points=group.fee_basis_points,
        min_price_per_gpu_hour_micro_credits=group.min_price,
        max_price_per_gpu_hour_micro_credits=group.max_price,
        min_payout_micro_credits=group.min_payout,
    )


def fleet_pb(status: FleetStatus) -> admin_pb2.GetFleetStatusResponse:
    counts, cycles = status.counts, status.cycles
    last = cycles.last
    return admin_pb2.GetFleetStatusResponse(
        hosts=[admin_pb2.HostStateCount(state=s.pb, count=n) for s, n in counts.hosts.items()],
        jobs=[admin_pb2.JobStateCount(state=s.pb, count=n) for s, n in counts.jobs.items()],
        queue_depth=counts.jobs[JobState.QUEUED],
        outbox_backlog=counts.outbox_backlog,
        outbox_oldest_seconds=counts.outbox_oldest_seconds,
        commands_unacked=counts.commands_unacked,
        commands_oldest_seconds=counts.commands_oldest_seconds,
        scheduler_leader_here=status.leader_here,
        scheduler=admin_pb2.SchedulerCycles(
            last_cycle_at=timestamp(cycles.last_at),
            last_cycle_seconds=last.seconds if last else 0.0,
            last_considered=last.considered if last else 0,
            last_placed=last.placed if last else 0,
            p50_seconds=cycles.p50_seconds,
            p99_seconds=cycles.p99_seconds,
            cycles_in_window=cycles.count,
        ),
    )


def token_pb(row: RegistrationToken) -> types_pb2.RegistrationToken:
    return types_pb2.RegistrationToken(
        token_id=row.id,
        provider_tenant_id=row.provider_tenant_id,
        label=row.label,
        created_at=timestamp(row.created_at),
        expires_at=timestamp(row.expires_at),
        max_uses=row.max_uses,
        uses=row.uses,
        revoked_at=timestamp(row.revoked_at),
    )
