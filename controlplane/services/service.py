"""Services: deployed, read, scaled, stopped, started and deleted; their replicas are jobs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gpuplane.v1 import registry_pb2, types_pb2
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.db.base import new_id, utcnow
from controlplane.errors import AlreadyExists, NotFound
from controlplane.idempotency import ensure_same
from controlplane.jobs.models import Job
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.service import JobService
from controlplane.services.models import Service, ServiceEvent, ServiceReplica
from controlplane.services.repository import ServiceRepository
from controlplane.services.settings import ServiceSettings
from controlplane.services.spec import (
    replica_spec,
    validate_name,
    validate_replicas,
)
from controlplane.services.states import (
    ServiceState,
    new_service,
    note_service_event,
    set_service_state,
)

if TYPE_CHECKING:
    from controlplane.gateway.proxy import Gateway
    from controlplane.gateway.watch import RouteWatcher

PREFIX = "svc"
REPLICA_PREFIX = "rep"


@dataclass
class ServiceView:
    service: Service
    replicas: list[tuple[ServiceReplica, Job]] = field(default_factory=list)
    charged: int = 0
    events: Sequence[ServiceEvent] = ()
    # Each replica's run time so far (ms).
    run_times: dict[str, int] = field(default_factory=dict)


def spec_of(service: Service) -> types_pb2.JobSpec:
    return types_pb2.JobSpec.FromString(service.spec)


def _missing(ref: str) -> NotFound:
    return NotFound(f"service: no service {ref[:63]!r}")


class ServiceService:
    """Services' lifecycle; the reconciler (services.reconciler) makes the replicas follow."""

    def __init__(self, jobs: JobService, settings: ServiceSettings) -> None:
        self.jobs = jobs
        self.settings = settings
        # Set when a service changed: the reconciler looks at once instead of next interval.
        self.changed = asyncio.Event()
        # The gateway this process serves, if any (services.wiring.services_loop).
        self.gateway: Gateway | None = None
        self.route_watcher: RouteWatcher | None = None
        # Told the id of each service that changed, after its commit (the gateway's routes).
        self.listeners: list[Callable[[str], None]] = []

    def touched(self, service_id: str) -> None:
        """A service (its state, count, replicas' readiness or keys) changed and committed:
        the reconciler looks at once, and the listeners hear of it."""
        self.changed.set()
        for listener in self.listeners:
            listener(service_id)

    async def deploy(
        self,
        caller: Principal,
        name: str,
        spec: types_pb2.JobSpec,
        port: int,
        replicas: int,
        health_path: str,
        idempotency_key: str | None,
        request_hash: str,
    ) -> ServiceView:
        validate_name(name)
        validate_replicas(replicas)
        made = replica_spec(spec, port, health_path, int(self.settings.lease_seconds))
        made = self.jobs.prepare_spec(made)  # the job rules (image, GPUs, constraints) now
        now = utcnow()
        service_id = new_id(PREFIX)
        made.service_replica.service_id = service_id

        async def work(session: AsyncSession) -> Service:
            repo = ServiceRepository(session)
            if idempotency_key:
                existing = await repo.by_idempotency_key(caller.tenant_id, idempotency_key)
                if existing is not None:
                    ensure_same(existing.request_hash, request_hash, idempotency_key)
                    return existing
            if await repo.by_live_name(caller.tenant_id, name) is not None:
                raise AlreadyExists(f"name: you already have a service named {name!r}")
            service = Service(
                id=service_id,
                tenant_id=caller.tenant_id,
                name=name,
                live_name=name,
                spec=made.SerializeToString(deterministic=True),
                desired_replicas=replicas,
                restarts=0,
                failures=0,
                launched=0,
                last_failure="",
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                created_at=now,
            )
            new_service(repo, service, now)
            return service

        try:
            service = await self.jobs.db.run(work)
        except IntegrityError:
            raise AlreadyExists(f"name: you already have a service named {name!r}") from None
        self.touched(service.id)
        return await self.get(caller, service.id)

    async def get(self, caller: Principal, ref: str) -> ServiceView:
        async with self.jobs.db.read() as session:
            repo = ServiceRepository(session)
            service = await repo.find(caller, ref)
            if service is None:
                raise _missing(ref)
            replicas = await repo.replicas([service.id])
            charged = await repo.charged([service.id])
            events = await repo.events(service.id)
            run_times = await repo.run_times([j.id for _, j in replicas])
        return ServiceView(service, replicas, charged.get(service.id, 0), events, run_times)

    async def list_services(
        self, caller: Principal, tenant_id: str, include_deleted: bool
    ) -> list[ServiceView]:
        tenant = caller.require_tenant(tenant_id)
        async with self.jobs.db.read() as session:
            repo = ServiceRepository(session)
            services = await repo.of_tenant(tenant, include_deleted)
            ids = [s.id for s in services]
            replicas = await repo.replicas(ids) if ids else []
            charged = await repo.charged(ids) if ids else {}
            run_times = await repo.run_times([j.id for _, j in replicas])
        views = {s.id: ServiceView(s, [], charged.get(s.id, 0), (), run_times) for s in services}
        for replica, job in replicas:
            views[replica.service_id].replicas.append((replica, job))
        return list(views.values())

    async def scale(self, caller: Principal, ref: str, replicas: int) -> ServiceView:
        validate_replicas(replicas)

        def change(repo: ServiceRepository, service: Service) -> None:
            if service.desired_replicas != replicas:
                before = service.desired_replicas
                service.desired_replicas = replicas
                note_service_event(repo, service, f"scaled from {before} to {replicas}", utcnow())

        return await self._change(caller, ref, change)

    async def stop(self, caller: Principal, ref: str) -> ServiceView:
        def change(repo: ServiceRepository, service: Service) -> None:
            set_service_state(repo, service, ServiceState.STOPPED, "stopped by the user", utcnow())

        return await self._change(caller, ref, change)

    async def start(self, caller: Principal, ref: str) -> ServiceView:
        def change(repo: ServiceRepository, service: Service) -> None:
            if set_service_state(
                repo, service, ServiceState.ACTIVE, "started by the user", utcnow()
            ):
                service.failures, service.backoff_until = 0, None

        return await self._change(caller, ref, change)

    async def delete(self, caller: Principal, ref: str) -> ServiceView:
        def change(repo: ServiceRepository, service: Service) -> None:
            set_service_state(repo, service, ServiceState.DELETED, "deleted by the user", utcnow())

        return await self._change(caller, ref, change, deleting=True)

    async def replica_health(self, host_id: str, health: registry_pb2.ReplicaHealth) -> None:
        """A daemon's probe result: the replica's readiness and its restarts in place, kept
        when it is the replica's live attempt on that host (a stale or foreign report changes
        nothing). The restarts are the provider's word: a report adds one at most, and they
        change nothing but what is shown (the attempt runs and is billed throughout)."""
        now = utcnow()

        async def work(session: AsyncSession) -> str | None:
            repo = ServiceRepository(session)
            replica = await repo.replica(health.job_id, lock=True)
            job = await JobRepository(session).get(health.job_id)
            if replica is None or job is None or job.host_id != host_id:
                return None
            restarted = health.restarts > replica.restarts
            if job.attempt != health.attempt or (replica.ready == health.ready and not restarted):
                return None
            # Kept as probed: its RUNNING report (through NATS) may come after this; a
            # replica counts as ready only while RUNNING too (api.services.replica_pb).
            replica.ready = health.ready
            said = "ready" if replica.ready else f"not ready: {health.reason}"
            if restarted:  # the reason says why and when it starts again; ready: it did
                replica.restarts += 1
                said = f"restarted in place ({replica.restarts})"
                said += f": {health.reason}" if health.reason else ""
            service = await repo.get(replica.service_id, lock=True)
            if service is not None:
                note_service_event(repo, service, f"replica {job.id} {said}", now)
            return replica.service_id

        changed = await self.jobs.db.run(work)
        if changed is not None:
            self.touched(changed)

    async def _change(
        self,
        caller: Principal,
        ref: str,
        change: Callable[[ServiceRepository, Service], None],
        deleting: bool = False,
    ) -> ServiceView:
        """Applies `change(repo, service)` to the caller's service under its row lock; a
        deleted service is NOT_FOUND (deleting it again returns it as it is)."""

        async def work(session: AsyncSession) -> Service:
            repo = ServiceRepository(session)
            service = await repo.find(caller, ref, lock=True)
            if service is None:
                raise _missing(ref)
            if service.state == ServiceState.DELETED.value:
                if deleting:
                    return service
                raise NotFound(f"service: {ref[:63]!r} was deleted")
            change(repo, service)
            return service

        service = await self.jobs.db.run(work)
        self.touched(service.id)
        return await self.get(caller, service.id)
