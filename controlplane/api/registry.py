"""RegistryService: host registration, the daemon's Connect stream, hosts, drain, offers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC
from typing import Any

from gpuplane.v1 import registry_pb2, registry_pb2_grpc, types_pb2

from controlplane.api.convert import timestamp
from controlplane.auth.principal import Role, current_principal
from controlplane.errors import InvalidArgument, PermissionDenied, Unauthenticated
from controlplane.jobs.service import JobService
from controlplane.paging import PageRequest
from controlplane.registry.access import HostAccess
from controlplane.registry.models import Gpu, Host
from controlplane.registry.offers import Offer, OfferFilter
from controlplane.registry.service import RegistryService
from controlplane.registry.states import HostState
from controlplane.registry.telemetry import GpuSeries
from messaging.natsjwt import host_inbox_prefix
from messaging.subjects import DISPATCH_STREAM, dispatch_durable, dispatch_subject

Context = Any

PB_HOST_STATE = {s.pb: s for s in HostState}
NO_TELEMETRY: dict[str, GpuSeries] = {}


def gpu_pb(row: Gpu, series: GpuSeries | None = None, recent: bool = False) -> types_pb2.Gpu:
    """A GPU as stored, with its latest sample (and recent ones) when this process has them."""
    message = types_pb2.Gpu(
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
    if series is not None and series.recent:
        if recent:
            message.recent.extend(series.history())
            message.latest.CopyFrom(message.recent[-1])
        else:
            message.latest.MergeFromString(series.recent[-1])
    return message


def host_pb(
    row: Host,
    gpus: Sequence[Gpu],
    telemetry: dict[str, GpuSeries] = NO_TELEMETRY,
    recent: bool = False,
) -> types_pb2.Host:
    return types_pb2.Host(
        host_id=row.id,
        hostname=row.hostname,
        provider_tenant_id=row.provider_tenant_id,
        state=HostState(row.state).pb,
        simulated=row.simulated,
        location=row.location,
        labels={str(k): str(v) for k, v in row.labels.items()},
        price_per_gpu_hour_micro_credits=row.price_per_gpu_hour,
        gpus=[gpu_pb(g, telemetry.get(g.uuid), recent) for g in gpus],
        registered_at=timestamp(row.registered_at),
        last_heartbeat_at=timestamp(row.last_heartbeat_at),
        reliability_permille=row.reliability_permille,
        daemon_version=row.daemon_version,
        driver_version=row.driver_version,
        cuda_driver_version=row.cuda_driver_version,
        cpu_count=row.cpu_count,
        memory_bytes=row.memory_bytes,
        drain_reason=row.drain_reason,
        job_ids=sorted({g.job_id for g in gpus if g.job_id}),
        revoked_at=timestamp(row.revoked_at),
        revoked_reason=row.revoked_reason or "",
        verified=row.verified_at is not None,
        verification_reason=row.verification_reason,
        verified_at=timestamp(row.verified_at),
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        registry: RegistryService,
        jobs: JobService,
        access: HostAccess,
        *,
        nats_servers: list[str],
        heartbeat_interval_ms: int,
        telemetry_interval_ms: int,
    ) -> None:
        self.registry = registry
        self.jobs = jobs
        self.access = access
        self.nats_servers = nats_servers
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.telemetry_interval_ms = telemetry_interval_ms

    async def RegisterHost(
        self, request: registry_pb2.RegisterHostRequest, context: Context
    ) -> registry_pb2.RegisterHostResponse:
        registration, gpus = await self.access.register(request)
        host = registration.host
        return registry_pb2.RegisterHostResponse(
            host_id=host.id,
            host_credential=registration.credential,
            nats=registry_pb2.NatsConnection(
                servers=self.nats_servers,
                dispatch_subject=dispatch_subject(host.id),
                stream=DISPATCH_STREAM,
                durable=dispatch_durable(host.id),
                credentials=registration.nats_credentials,
                inbox_prefix=host_inbox_prefix(host.id) if registration.nats_credentials else "",
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
        # Not declared lost while its hello waits its turn here (a reconnect storm).
        with self.registry.serving_sign_of_life(host_id):
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("msg") != "hello":
                raise InvalidArgument("hello", "the first message on Connect must be a hello")
            if first.hello.host_id and first.hello.host_id != host_id:
                raise PermissionDenied("hello.host_id: a host credential acts only as its own host")
            host = await self.registry.connect(host_id, first.hello.running_jobs, first.hello)
        stream = self.registry.streams.open(host_id)
        known = await self.jobs.live_attempts(host_id)
        yield registry_pb2.ControlMessage(
            hello_ack=registry_pb2.HelloAck(
                host_id=host_id,
                heartbeat_interval_ms=self.heartbeat_interval_ms,
                telemetry_interval_ms=self.telemetry_interval_ms,
                known_jobs=known,
            )
        )
        # Heard again as the ack leaves: the daemon's first heartbeat comes an interval after
        # it, which the hello's own timestamp (written before reads that may have queued
        # behind a reconnect storm) must not have to cover too.
        self.registry.acknowledged(host_id)
        if host.drain_reason:
            yield registry_pb2.ControlMessage(
                drain=registry_pb2.DrainCommand(draining=True, reason=host.drain_reason)
            )
        reader = asyncio.create_task(self._read(host_id, request_iterator))
        revoked = asyncio.create_task(stream.revoked.wait())
        closing = asyncio.create_task(self.registry.streams.closing.wait())
        getter: asyncio.Task[registry_pb2.ControlMessage] | None = None
        try:
            # Commands stored for the host (on any replica) come through this stream now.
            await self.registry.commands.opened(host_id)
            while not reader.done() and not closing.done():
                getter = asyncio.create_task(stream.commands.get())
                done, _ = await asyncio.wait(
                    {getter, reader, revoked, closing}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in done:
                    yield getter.result()
                getter.cancel()
                if revoked in done:
                    raise Unauthenticated("host credential: the host has been revoked")
            if reader.done():
                reader.result()
        finally:
            for task in (reader, getter, revoked, closing):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self.registry.disconnect(stream)

    async def _read(
        self, host_id: str, request_iterator: AsyncIterator[registry_pb2.DaemonMessage]
    ) -> None:
        async for message in request_iterator:
            kind = message.WhichOneof("msg")
            if kind == "telemetry":
                await self.registry.receive_telemetry(host_id, message.telemetry)
            elif kind == "heartbeat":
                beat = message.heartbeat
                sent = beat.time.ToDatetime(UTC) if beat.HasField("time") else None
                await self.registry.heartbeat(host_id, beat.running_jobs, sent)
            elif kind == "hello":
                await self.registry.heartbeat(host_id, message.hello.running_jobs)
            elif kind == "command_ack":
                await self.jobs.acknowledge_command(host_id, message.command_ack)
            elif kind == "probe_answer":
                await self.registry.probe_answer(host_id, message.probe_answer)
            elif kind == "replica_health" and self.registry.on_replica_health is not None:
                await self.registry.on_replica_health(host_id, message.replica_health)

    async def ListHosts(
        self, request: registry_pb2.ListHostsRequest, context: Context
    ) -> registry_pb2.ListHostsResponse:
        states = []
        for value in request.states:
            if value not in PB_HOST_STATE:
                raise InvalidArgument("states", f"unknown host state {value}")
            states.append(PB_HOST_STATE[value].value)
        page, gpus = await self.registry.list_hosts(
            current_principal(),
            states,
            request.provider_tenant_id,
            PageRequest(request.page_token, request.page_size),
            request.id_prefix,
        )
        telemetry = self.registry.telemetry_of
        return registry_pb2.ListHostsResponse(
            hosts=[host_pb(h, gpus.get(h.id, []), telemetry(h.id)) for h in page.items],
            next_page_token=page.next_cursor,
        )

    async def GetHost(
        self, request: registry_pb2.GetHostRequest, context: Context
    ) -> registry_pb2.GetHostResponse:
        if not request.host_id:
            raise InvalidArgument("host_id", "is required")
        host, gpus = await self.registry.get_host(current_principal(), request.host_id)
        telemetry = self.registry.telemetry_of(host.id)
        return registry_pb2.GetHostResponse(host=host_pb(host, gpus, telemetry, recent=True))

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

    async def UpdateHost(
        self, request: registry_pb2.UpdateHostRequest, context: Context
    ) -> registry_pb2.UpdateHostResponse:
        if not request.host_id:
            raise InvalidArgument("host_id", "is required")
        caller = current_principal()
        host = await self.registry.update_host(
            caller,
            request.host_id,
            price=(
                request.price_per_gpu_hour_micro_credits
                if request.HasField("price_per_gpu_hour_micro_credits")
                else None
            ),
            location=request.location if request.HasField("location") else None,
            labels=dict(request.labels) if request.replace_labels else None,
        )
        _, gpus = await self.registry.get_host(caller, host.id)
        servers = self.nats_servers if caller.role is Role.HOST else []
        return registry_pb2.UpdateHostResponse(host=host_pb(host, gpus), nats_servers=servers)

    async def RevokeHost(
        self, request: registry_pb2.RevokeHostRequest, context: Context
    ) -> registry_pb2.RevokeHostResponse:
        if not request.host_id:
            raise InvalidArgument("host_id", "is required")
        host, gpus = await self.access.revoke(current_principal(), request.host_id, request.reason)
        return registry_pb2.RevokeHostResponse(host=host_pb(host, gpus))

    async def RevokeProvider(
        self, request: registry_pb2.RevokeProviderRequest, context: Context
    ) -> registry_pb2.RevokeProviderResponse:
        hosts, tokens = await self.access.revoke_provider(
            request.provider_tenant_id, request.reason
        )
        return registry_pb2.RevokeProviderResponse(
            host_ids=[h.id for h in hosts], revoked_tokens=tokens
        )

    async def ListOffers(
        self, request: registry_pb2.ListOffersRequest, context: Context
    ) -> registry_pb2.ListOffersResponse:
        wanted = OfferFilter(
            gpu_type=request.gpu_type,
            min_vram_gib=request.min_vram_gib,
            max_price_per_gpu_hour=request.max_price_per_gpu_hour_micro_credits,
            min_gpu_count=request.min_gpu_count,
            location=request.location,
            labels=dict(request.labels),
            exclude_simulated=request.exclude_simulated,
            verified_only=request.verified_only,
        )
        page = await self.registry.list_offers(
            wanted, PageRequest(request.page_token, request.page_size)
        )
        return registry_pb2.ListOffersResponse(
            offers=[offer_pb(o) for o in page.items], next_page_token=page.next_cursor
        )


def offer_pb(offer: Offer) -> types_pb2.Offer:
    return types_pb2.Offer(
        host_id=offer.host_id,
        gpu_model=offer.gpu_model,
        vram_gib=offer.vram_gib,
        free_gpu_count=offer.free_gpu_count,
        total_gpu_count=offer.total_gpu_count,
        price_per_gpu_hour_micro_credits=offer.price_per_gpu_hour,
        location=offer.location,
        labels=offer.labels,
        reliability_permille=offer.reliability_permille,
        simulated=offer.simulated,
        compute_capability=offer.compute_capability,
        verified=offer.verified,
    )
