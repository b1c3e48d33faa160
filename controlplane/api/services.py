"""ServiceService: deploy, read, list, scale, stop, start and delete long-running services."""

from __future__ import annotations

from typing import Any

from gpuplane.v1 import services_pb2, services_pb2_grpc

from controlplane.api.convert import timestamp
from controlplane.auth.principal import current_principal
from controlplane.errors import InvalidArgument, NotFound
from controlplane.idempotency import check_key, fingerprint
from controlplane.jobs.models import Job
from controlplane.jobs.states import JobState
from controlplane.services.keys import ServiceKeys
from controlplane.services.models import ServiceKey, ServiceReplica
from controlplane.services.service import ServiceService, ServiceView, spec_of
from controlplane.services.states import ServiceState

Context = Any


def replica_pb(replica: ServiceReplica, job: Job, run_time_ms: int) -> services_pb2.ServiceReplica:
    return services_pb2.ServiceReplica(
        replica_id=job.id,
        state=JobState(job.state).pb,
        state_reason=job.state_reason,
        host_id=job.host_id or "",
        ready=replica.ready and job.state == JobState.RUNNING.value,
        created_at=timestamp(job.created_at),
        started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at),
        charged_micro_credits=job.charged,
        run_time_ms=run_time_ms,
        restarts=replica.restarts,
    )


def service_pb(view: ServiceView) -> services_pb2.Service:
    service, spec = view.service, spec_of(view.service)
    replicas = [replica_pb(r, j, view.run_times.get(j.id, 0)) for r, j in view.replicas]
    running = [r for r in replicas if r.state == JobState.RUNNING.pb]
    return services_pb2.Service(
        service_id=service.id,
        tenant_id=service.tenant_id,
        name=service.name,
        state=ServiceState(service.state).pb,
        state_reason=service.state_reason,
        image=spec.image,
        port=spec.service_replica.port,
        health_path=spec.service_replica.health_path,
        gpus_per_replica=spec.gpu_count,
        desired_replicas=service.desired_replicas,
        running_replicas=len(running),
        ready_replicas=sum(1 for r in running if r.ready),
        replicas=replicas,
        restarts=service.restarts,
        last_failure=service.last_failure,
        backoff_until=timestamp(service.backoff_until),
        charged_micro_credits=view.charged,
        created_at=timestamp(service.created_at),
        updated_at=timestamp(service.updated_at),
        spec=spec,
        events=[
            services_pb2.ServiceEvent(
                time=timestamp(e.time), state=ServiceState(e.state).pb, reason=e.reason
            )
            for e in view.events
        ],
    )


def _ref(ref: str) -> str:
    if not ref:
        raise InvalidArgument("service", "is required (its name or id)")
    if len(ref) > 63:
        raise NotFound(f"service: no service {ref[:63]!r}")
    return ref


def key_pb(key: ServiceKey) -> services_pb2.ServiceKey:
    return services_pb2.ServiceKey(
        key_id=key.id,
        service_id=key.service_id,
        description=key.description,
        prefix=key.prefix,
        created_at=timestamp(key.created_at),
        revoked_at=timestamp(key.revoked_at),
    )


class ServiceServicer(services_pb2_grpc.ServiceServiceServicer):
    def __init__(self, services: ServiceService) -> None:
        self.services = services
        self.keys = ServiceKeys(services)

    async def DeployService(
        self, request: services_pb2.DeployServiceRequest, context: Context
    ) -> services_pb2.DeployServiceResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required (its image at least)")
        view = await self.services.deploy(
            current_principal(),
            request.name,
            request.spec,
            request.port,
            request.replicas,
            request.health_path,
            check_key(request.idempotency_key),
            fingerprint(request),
        )
        return services_pb2.DeployServiceResponse(service=service_pb(view))

    async def GetService(
        self, request: services_pb2.GetServiceRequest, context: Context
    ) -> services_pb2.GetServiceResponse:
        view = await self.services.get(current_principal(), _ref(request.service))
        return services_pb2.GetServiceResponse(service=service_pb(view))

    async def ListServices(
        self, request: services_pb2.ListServicesRequest, context: Context
    ) -> services_pb2.ListServicesResponse:
        views = await self.services.list_services(
            current_principal(), request.tenant_id, request.include_deleted
        )
        return services_pb2.ListServicesResponse(services=[service_pb(v) for v in views])

    async def ScaleService(
        self, request: services_pb2.ScaleServiceRequest, context: Context
    ) -> services_pb2.ScaleServiceResponse:
        view = await self.services.scale(
            current_principal(), _ref(request.service), request.replicas
        )
        return services_pb2.ScaleServiceResponse(service=service_pb(view))

    async def StopService(
        self, request: services_pb2.StopServiceRequest, context: Context
    ) -> services_pb2.StopServiceResponse:
        view = await self.services.stop(current_principal(), _ref(request.service))
        return services_pb2.StopServiceResponse(service=service_pb(view))

    async def StartService(
        self, request: services_pb2.StartServiceRequest, context: Context
    ) -> services_pb2.StartServiceResponse:
        view = await self.services.start(current_principal(), _ref(request.service))
        return services_pb2.StartServiceResponse(service=service_pb(view))

    async def DeleteService(
        self, request: services_pb2.DeleteServiceRequest, context: Context
    ) -> services_pb2.DeleteServiceResponse:
        view = await self.services.delete(current_principal(), _ref(request.service))
        return services_pb2.DeleteServiceResponse(service=service_pb(view))

    async def CreateServiceKey(
        self, request: services_pb2.CreateServiceKeyRequest, context: Context
    ) -> services_pb2.CreateServiceKeyResponse:
        created = await self.keys.create(
            current_principal(),
            _ref(request.service),
            request.description,
            check_key(request.idempotency_key),
            fingerprint(request),
        )
        return services_pb2.CreateServiceKeyResponse(key=key_pb(created.key), secret=created.secret)

    async def ListServiceKeys(
        self, request: services_pb2.ListServiceKeysRequest, context: Context
    ) -> services_pb2.ListServiceKeysResponse:
        keys = await self.keys.list_keys(
            current_principal(), _ref(request.service), request.include_revoked
        )
        return services_pb2.ListServiceKeysResponse(keys=[key_pb(k) for k in keys])

    async def RevokeServiceKey(
        self, request: services_pb2.RevokeServiceKeyRequest, context: Context
    ) -> services_pb2.RevokeServiceKeyResponse:
        key = await self.keys.revoke(current_principal(), _ref(request.service), request.key_id)
        return services_pb2.RevokeServiceKeyResponse(key=key_pb(key))
