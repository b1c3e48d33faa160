"""RegistryService: host registration, the daemon's Connect stream, hosts, drain, offers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.api.convert import timestamp
from controlplane.auth.principal import current_principal
from controlplane.errors import InvalidArgument, PermissionDenied
from controlplane.jobs.service import JobService
from controlplane.paging import decode_token, encode_token, page_size
from controlplane.registry.models import Gpu, Host
from controlplane.registry.service import HostState, RegistryService
from controlplane.scheduler.matching import GIB
from controlplane.scheduler.service import capacity_snapshot
from messaging.subjects import DISPATCH_STREAM, dispatch_durable, dispatch_subject

log = logging.getLogger(__name__)
Context = Any

HOST_STATE_PB = {s: types_pb2.HostState.Value(f"HOST_STATE_{s.name}") for s in HostState}
PB_HOST_STATE = {v: k for k, v in HOST_STATE_PB.items()}


def gpu_pb(row: Gpu) -> types_pb2.Gpu:
    return types_pb2.Gpu(
        uuid=row.uuid,
        index=row.index,
        name=row.name,
        memory_total_bytes=row.memory_total_bytes,
        compute_capability=row.compute_capability,
        pci_bus_id=row.pci_bus_id,
        mig_mode=row.mig_mode,  # type: ignore[arg-type]
        power_limit_milliwatts=row.power_limit_milliwatts,
        healthy=row.healthy,
        unhealthy_reason=row.unhealthy_reason,
        job_id=row.job_id or "",
    )


def reliability_permille(host: Host) -> int:
    total = host.lost_attempts + host.completed_attempts
    return 1000 if total == 0 else (1000 * host.completed_attempts) // total


def host_pb(row: Host, gpus: Sequence[Gpu]) -> types_pb2.Host:
    return types_pb2.Host(
        host_id=row.id,
        hostname=row.hostname,
        provider_tenant_id=row.provider_tenant_id,
        state=HOST_STATE_PB[HostState(row.state)],
        simulated=row.simulated,
        location=row.location,
        labels={str(k): str(v) for k, v in row.labels.items()},
        price_per_gpu_hour_micro_credits=row.price_per_gpu_hour,
        gpus=[gpu_pb(g) for g in gpus],
        registered_at=timestamp(row.registered_at),
        last_heartbeat_at=timestamp(row.last_heartbeat_at),
        reliability_permille=reliability_permille(row),
        daemon_version=row.daemon_version,
        driver_version=row.driver_version,
        cuda_driver_version=row.cuda_driver_version,
        cpu_count=row.cpu_count,
        memory_bytes=row.memory_bytes,
        drain_reason=row.drain_reason,
        job_ids=sorted({g.job_id for g in gpus if g.job_id}),
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        registry: RegistryService,
        jobs: JobService,
        *,
        nats_servers: list[str],
        heartbeat_interval_ms: int,
        telemetry_interval_ms: int,
    ) -> None:
        self.registry = registry
        self.jobs = jobs
        self.nats_servers = nats_servers
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.telemetry_interval_ms = telemetry_interval_ms

    async def RegisterHost(
        self, request: registry_pb2.RegisterHostRequest, context: Context
    ) -> registry_pb2.RegisterHostResponse:
        registration = await self.registry.register_host(request)
        host = registration.host
        _, gpus = await self.registry.get_host(current_principal_or_host(host), host.id)
        return registry_pb2.RegisterHostResponse(
            host_id=host.id,
            host_credential=registration.credential,
            nats=registry_pb2.NatsConnection(
                servers=self.nats_servers,
                dispatch_subject=dispatch_subject(host.id),
                stream=DISPATCH_STREAM,
                durable=dispatch_durable(host.id),
            ),
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            telemetry_interval_ms=self.telemetry_interval_ms,
            host=host_pb(host, gpus),
        )

    async def Connect(
        self, request_iterator: AsyncIterator[registry_pb2.DaemonMessage], context: Context
    ) -> AsyncIterator[registry_pb2.ControlMessage]:
        caller = current_principal()
        host_id = caller.principal_id
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("msg") != "hello":
            raise InvalidArgument("hello", "the first message on Connect must be a hello")
        if first.hello.host_id and first.hello.host_id != host_id:
            raise PermissionDenied("hello.host_id: a host credential acts only as its own host")
        await self.registry.heartbeat(host_id)
        session = self.registry.sessions.open(host_id)
        known = await self.jobs.live_attempts(host_id)
        yield registry_pb2.ControlMessage(
            hello_ack=registry_pb2.HelloAck(
                host_id=host_id,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                telemetry_interval_ms=self.telemetry_interval_ms,
                known_jobs=known,
            )
        )
        reader = asyncio.create_task(self._read(host_id, request_iterator))
        try:
            while not reader.done():
                getter = asyncio.create_task(session.outbox.get())
                done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
            reader.result()
        finally:
            self.registry.sessions.close(session)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(
        self, host_id: str, request_iterator: AsyncIterator[registry_pb2.DaemonMessage]
    ) -> None:
        async for message in request_iterator:
            kind = message.WhichOneof("msg")
            if kind == "heartbeat":
                await self.registry.heartbeat(host_id)
            elif kind == "hello":
                await self.registry.heartbeat(host_id)
            # Telemetry is ingested by the registry issue; accepted and dropped until then.

    async def ListHosts(
        self, request: registry_pb2.ListHostsRequest, context: Context
    ) -> registry_pb2.ListHostsResponse:
        states = []
        for value in request.states:
            if value not in PB_HOST_STATE:
                raise InvalidArgument("states", f"unknown host state {value}")
            states.append(PB_HOST_STATE[value].value)
        cursor = decode_token(request.page_token)
        limit = page_size(request.page_size)
        hosts, gpus = await self.registry.list_hosts(
            current_principal(),
            states,
            request.provider_tenant_id,
            cursor["after"] if cursor else None,
            limit + 1,
        )
        more = len(hosts) > limit
        hosts = hosts[:limit]
        return registry_pb2.ListHostsResponse(
            hosts=[host_pb(h, gpus.get(h.id, [])) for h in hosts],
            next_page_token=encode_token({"after": hosts[-1].id}) if more else "",
        )

    async def GetHost(
        self, request: registry_pb2.GetHostRequest, context: Context
    ) -> registry_pb2.GetHostResponse:
        if not request.host_id:
            raise InvalidArgument("host_id", "is required")
        host, gpus = await self.registry.get_host(current_principal(), request.host_id)
        return registry_pb2.GetHostResponse(host=host_pb(host, gpus))

    async def DrainHost(
        self, request: registry_pb2.DrainHostRequest, context: Context
    ) -> registry_pb2.DrainHostResponse:
        caller = current_principal()
        host = await self.registry.set_draining(caller, request.host_id, True, request.reason)
        _, gpus = await self.registry.get_host(caller, host.id)
        return registry_pb2.DrainHostResponse(host=host_pb(host, gpus))

    async def UndrainHost(
        self, request: registry_pb2.UndrainHostRequest, context: Context
    ) -> registry_pb2.UndrainHostResponse:
        caller = current_principal()
        host = await self.registry.set_draining(caller, request.host_id, False, "")
        _, gpus = await self.registry.get_host(caller, host.id)
        return registry_pb2.UndrainHostResponse(host=host_pb(host, gpus))

    async def ListOffers(
        self, request: registry_pb2.ListOffersRequest, context: Context
    ) -> registry_pb2.ListOffersResponse:
        current_principal()
        if request.max_price_per_gpu_hour_micro_credits < 0:
            raise InvalidArgument("max_price_per_gpu_hour_micro_credits", "must not be negative")
        cursor = decode_token(request.page_token)
        offset = int(cursor.get("offset", 0)) if cursor else 0
        limit = page_size(request.page_size)
        async with self.registry.db.read() as session:
            hosts = await capacity_snapshot(session)
        offers: list[types_pb2.Offer] = []
        wanted = request.gpu_type.lower()
        for host in hosts:
            if request.exclude_simulated and host.simulated:
                continue
            if request.location and host.location != request.location:
                continue
            if any(host.labels.get(k) != v for k, v in request.labels.items()):
                continue
            limit_price = request.max_price_per_gpu_hour_micro_credits
            if limit_price and host.price_per_gpu_hour > limit_price:
                continue
            by_model: dict[str, list[Any]] = {}
            for gpu in host.free:
                by_model.setdefault(gpu.name, []).append(gpu)
            for model, free in sorted(by_model.items()):
                vram = free[0].memory_total_bytes // GIB
                if wanted and wanted not in model.lower():
                    continue
                if vram < request.min_vram_gib or len(free) < request.min_gpu_count:
                    continue
                offers.append(
                    types_pb2.Offer(
                        host_id=host.host_id,
                        gpu_model=model,
                        vram_gib=vram,
                        free_gpu_count=len(free),
                        total_gpu_count=host.total_gpus,
                        price_per_gpu_hour_micro_credits=host.price_per_gpu_hour,
                        location=host.location,
                        labels=host.labels,
                        simulated=host.simulated,
                        compute_capability=free[0].compute_capability,
                    )
                )
        page = offers[offset : offset + limit]
        more = offset + limit < len(offers)
        return registry_pb2.ListOffersResponse(
            offers=page,
            next_page_token=encode_token({"offset": offset + limit}) if more else "",
        )


def current_principal_or_host(host: Host) -> Any:
    """RegisterHost runs without a key: read the new host back as that host."""
    from controlplane.auth.principal import Principal, Role

    return Principal(tenant_id=host.provider_tenant_id, role=Role.HOST, principal_id=host.id)
