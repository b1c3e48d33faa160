"""Which roles may call which RPC. A method missing from this table is denied to everyone."""

from __future__ import annotations

from controlplane.auth.principal import Role

A, C, P, H = Role.ADMIN, Role.CONSUMER, Role.PROVIDER, Role.HOST

# Methods any client may call with no credential at all.
PUBLIC_METHODS: frozenset[str] = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        # Authenticated by the registration token in the request body.
        "/gpuplane.v1.RegistryService/RegisterHost",
    }
)

ALLOWED_ROLES: dict[str, frozenset[Role]] = {
    # JobService: consumers own jobs; admins see all. Ownership is checked in the service.
    "/gpuplane.v1.JobService/SubmitJob": frozenset({A, C}),
    "/gpuplane.v1.JobService/GetJob": frozenset({A, C}),
    "/gpuplane.v1.JobService/ListJobs": frozenset({A, C}),
    "/gpuplane.v1.JobService/CancelJob": frozenset({A, C}),
    "/gpuplane.v1.JobService/WatchJob": frozenset({A, C}),
    "/gpuplane.v1.JobService/StreamLogs": frozenset({A, C}),
    "/gpuplane.v1.JobService/GetResults": frozenset({A, C}),
    "/gpuplane.v1.JobService/GetJobEfficiency": frozenset({A, C}),
    # SessionService: interactive sessions are consumers' jobs; ownership in the service.
    "/gpuplane.v1.SessionService/CreateSession": frozenset({A, C}),
    "/gpuplane.v1.SessionService/GetSession": frozenset({A, C}),
    "/gpuplane.v1.SessionService/ListSessions": frozenset({A, C}),
    "/gpuplane.v1.SessionService/ExtendSession": frozenset({A, C}),
    "/gpuplane.v1.SessionService/FinishSession": frozenset({A, C}),
    "/gpuplane.v1.SessionService/DestroySession": frozenset({A, C}),
    # ServiceService: long-running services are consumers'; ownership in the service.
    "/gpuplane.v1.ServiceService/DeployService": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/GetService": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/ListServices": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/ScaleService": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/StopService": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/StartService": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/DeleteService": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/CreateServiceKey": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/ListServiceKeys": frozenset({A, C}),
    "/gpuplane.v1.ServiceService/RevokeServiceKey": frozenset({A, C}),
    # DataService: a caller's own input area (inputs/<tenant>/), scoped in the service.
    "/gpuplane.v1.DataService/CreateUpload": frozenset({A, C}),
    "/gpuplane.v1.DataService/CompleteUpload": frozenset({A, C}),
    "/gpuplane.v1.DataService/AbortUpload": frozenset({A, C}),
    "/gpuplane.v1.DataService/ListInputs": frozenset({A, C}),
    "/gpuplane.v1.DataService/DeleteInput": frozenset({A, C}),
    # RegistryService.
    "/gpuplane.v1.RegistryService/Connect": frozenset({H}),
    "/gpuplane.v1.RegistryService/ListHosts": frozenset({A, P}),
    "/gpuplane.v1.RegistryService/GetHost": frozenset({A, P}),
    "/gpuplane.v1.RegistryService/DrainHost": frozenset({A, P}),
    "/gpuplane.v1.RegistryService/UndrainHost": frozenset({A, P}),
    # The host itself too: its daemon applies its flags at start. Ownership in the service.
    "/gpuplane.v1.RegistryService/UpdateHost": frozenset({A, P, H}),
    # Revoking a host ends its gRPC credential and NATS user for good: the platform decides.
    "/gpuplane.v1.RegistryService/RevokeHost": frozenset({A}),
    "/gpuplane.v1.RegistryService/RevokeProvider": frozenset({A}),
    "/gpuplane.v1.RegistryService/ListOffers": frozenset({A, C, P}),
    # LedgerService.
    "/gpuplane.v1.LedgerService/GetBalance": frozenset({A, C, P}),
    "/gpuplane.v1.LedgerService/ListEntries": frozenset({A, C, P}),
    "/gpuplane.v1.LedgerService/Deposit": frozenset({A}),
    "/gpuplane.v1.LedgerService/Payout": frozenset({A, P}),
    "/gpuplane.v1.LedgerService/RefundJob": frozenset({A}),
    "/gpuplane.v1.LedgerService/GetUsage": frozenset({A, C, P}),
    "/gpuplane.v1.LedgerService/CheckLedger": frozenset({A}),
    "/gpuplane.v1.LedgerService/ListPayouts": frozenset({A, P}),
    "/gpuplane.v1.LedgerService/MarkPayoutPaid": frozenset({A}),
    "/gpuplane.v1.LedgerService/FailPayout": frozenset({A}),
    # A consumer's own monthly spending limit; admins any tenant's.
    "/gpuplane.v1.LedgerService/SetSpendingLimit": frozenset({A, C}),
    "/gpuplane.v1.LedgerService/GetBudget": frozenset({A, C}),
    # TunnelService: into a consumer's own running job (any for admins); checked in the
    # service, where another tenant's job is NOT_FOUND.
    "/gpuplane.v1.TunnelService/Exec": frozenset({A, C}),
    "/gpuplane.v1.TunnelService/PortForward": frozenset({A, C}),
    # The daemon's call back for a tunnel its control plane asked it to open.
    "/gpuplane.v1.TunnelRelayService/Tunnel": frozenset({H}),
    # AdminService.
    "/gpuplane.v1.AdminService/WhoAmI": frozenset({A, C, P, H}),
    "/gpuplane.v1.AdminService/CreateTenant": frozenset({A}),
    "/gpuplane.v1.AdminService/ListTenants": frozenset({A}),
    "/gpuplane.v1.AdminService/CreateApiKey": frozenset({A}),
    "/gpuplane.v1.AdminService/ListApiKeys": frozenset({A}),
    "/gpuplane.v1.AdminService/RevokeApiKey": frozenset({A}),
    "/gpuplane.v1.AdminService/CreateRegistrationToken": frozenset({A, P}),
    "/gpuplane.v1.AdminService/ListRegistrationTokens": frozenset({A, P}),
    "/gpuplane.v1.AdminService/RevokeRegistrationToken": frozenset({A, P}),
    "/gpuplane.v1.AdminService/GetPricingPolicy": frozenset({A, C, P}),
    "/gpuplane.v1.AdminService/SetPricingPolicy": frozenset({A}),
    "/gpuplane.v1.AdminService/GetFleetStatus": frozenset({A}),
}


def allowed_roles(method: str) -> frozenset[Role]:
    """Roles allowed on `method` ("/package.Service/Method"); empty = nobody."""
    return ALLOWED_ROLES.get(method, frozenset())
