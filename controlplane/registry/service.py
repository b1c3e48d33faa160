"""Host registration and credentials, heartbeats, liveness, drain, updates, offers (with the
registration tokens of registry/tokens.py and the revocations of registry/revocation.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from gpuplane.v1 import registry_pb2

from controlplane.auth.principal import Principal, Role
from controlplane.auth.service import generate_secret, hash_secret
from controlplane.commands.delivery import CommandDelivery
from controlplane.commands.repository import CommandRepository
from controlplane.db.base import new_id, utcnow
from controlplane.db.engine import Database
from controlplane.db.prefix import validate_id_prefix
from controlplane.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from controlplane.ledger.batch import GroupCommit
from controlplane.paging import Page, PageRequest, offset_of, page_by_offset
from controlplane.registry.lag import LoopLag
from controlplane.registry.liveness import MAX_SIGNS_BATCH, Liveness
from controlplane.registry.models import Gpu, Host
from controlplane.registry.monitor import GpuMonitor
from controlplane.registry.natsauth import NatsAuth
from controlplane.registry.offers import Offer, OfferFilter, build_offers
from controlplane.registry.reliability import note_outcome
from controlplane.registry.repository import RegistryRepository
from controlplane.registry.revocation import Revocations
from controlplane.registry.states import (
    HostState,
    new_host,
    set_host_state,
    set_verification,
)
from controlplane.registry.streams import HostStream
from controlplane.registry.streams import HostStreams as HostStreams  # re-exported
from controlplane.registry.telemetry import GpuSeries
from controlplane.registry.tokens import RegistrationTokens
from controlplane.registry.validation import validate_offer, validate_registration
from controlplane.scheduler.capacity import capacity_snapshot
from controlplane.verification.service import VerificationService, fingerprint

log = logging.getLogger(__name__)

HOST_CREDENTIAL_PREFIX = "gph_"
# Registrations and hellos this process serves at once (about its database pool's size).
CONNECTS_AT_ONCE = 16
# Stored when DrainHost names no reason: a non-empty drain_reason is what records the request.
DEFAULT_DRAIN_REASON = "drain requested"
NO_USES_LEFT = "registration_token: has no uses left"


@dataclass
class HostRegistration:
    """What RegisterHost hands back (the credential is shown only here)."""

    host: Host
    credential: str
    # .creds text of the host's new NATS user ("" while NATS auth is off).
    nats_credentials: str = ""
    # Re-registration revoked the host's earlier NATS user: the account JWT must be pushed.
    revoked_nats_user: bool = False
    # The host's GPUs as stored (read in the registering transaction, not after it).
    gpus: Sequence[Gpu] = ()


async def _unverify_if_changed(repo: RegistryRepository, host: Host, now: datetime) -> None:
    """A verified host was verified for what it was: a new driver or GPU set waits for a
    new probe (its next hello)."""
    await repo.flush()
    if host.verified_at is not None:
        if fingerprint(host, await repo.gpus_of([host.id])) != host.verified_fingerprint:
            set_verification(repo, host, None, "its GPUs or driver changed", now)


class RegistryService(RegistrationTokens, Revocations, Liveness):
    """Hosts and their liveness. Heartbeats of hosts known to be up are written together, one
    statement for all of them, by flush_heartbeats() (the liveness loop, every
    `heartbeat_write_interval` seconds at most); liveness allows for that lag and for this
    process's stalls (registry/liveness.py). `monitor` keeps the telemetry of the hosts
    connected to this process."""

    def __init__(
        self,
        db: Database,
        *,
        max_price: int,
        self_service_providers: bool = False,
        monitor: GpuMonitor | None = None,
        heartbeat_write_interval: float = 0.0,
        nats_auth: NatsAuth | None = None,
        command_poll_interval: float = 0.5,
        command_resend_after: float = 2.0,
    ) -> None:
        self.db = db
        self.nats_auth = nats_auth
        self.max_price = max_price
        # Whether a provider may mint its own registration tokens (registry/tokens.py).
        self.self_service_providers = self_service_providers
        self.streams = HostStreams()
        # Delivers the stored commands of the hosts whose Connect stream is open here.
        self.commands = CommandDelivery(
            db,
            self.streams,
            poll_interval=command_poll_interval,
            resend_after=command_resend_after,
        )
        self.monitor = monitor
        self.heartbeat_write_interval = heartbeat_write_interval
        # Hosts this process has seen up (not lost) since their last (re)connection, and those
        # heard from since the last flush.
        self._up: set[str] = set()
        self._heard: set[str] = set()
        self._pending: dict[str, tuple[int, float]] = {}
        self._registered: dict[str, float] = {}
        self._signs = GroupCommit(
            self._record_batch, max_batch=MAX_SIGNS_BATCH, max_in_flight=1, min_batch=1
        )
        # Registrations and hellos served at once; the others wait parked (their hosts are
        # spared meanwhile), so a fleet reconnecting does not fill the event loop's queue
        # ahead of every other call.
        self.connecting = asyncio.Semaphore(CONNECTS_AT_ONCE)
        # How late this process's loop runs (run by the liveness loop's owner: Background).
        self.loop_lag = LoopLag()
        # The attempts each daemon connected here said it runs in its last heartbeat (or
        # hello), reconciled with the live attempts (jobs/reconcile.py).
        self._running: dict[str, frozenset[tuple[str, int]]] = {}
        # Called when a host connects (and so offers its GPUs): the market view holds are
        # priced on is then reread at once instead of within a few seconds.
        self.on_host_connected: Callable[[], None] | None = None
        # Takes a daemon's ReplicaHealth (services.service.ServiceService.replica_health).
        self.on_replica_health: (
            Callable[[str, registry_pb2.ReplicaHealth], Awaitable[None]] | None
        ) = None
        # Observes each heartbeat's processing lag, seconds (metrics.watch_liveness).
        self.on_heartbeat_lag: Callable[[float], None] | None = None
        # Probes hosts' hardware (controlplane/verification); None: no probes are sent.
        self.verification: VerificationService | None = None

    # Hosts ---------------------------------------------------------------------------------

    async def register_host(self, request: registry_pb2.RegisterHostRequest) -> HostRegistration:
        """Exchanges a registration token for a host and a fresh host credential."""
        if not request.registration_token:
            raise Unauthenticated("registration_token: is required")
        validate_registration(request, self.max_price)
        credential = generate_secret(HOST_CREDENTIAL_PREFIX)
        now = utcnow()
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            token = await repo.token_by_hash(hash_secret(request.registration_token))
            if token is None:
                raise Unauthenticated("registration_token: not a valid registration token")
            if token.revoked_at is not None:
                raise PermissionDenied("registration_token: has been revoked")
            if token.expires_at <= now:
                raise PermissionDenied("registration_token: has expired")
            host = await repo.host_by_machine(token.provider_tenant_id, request.machine_id)
            if host is not None and host.revoked_at is not None:
                raise PermissionDenied(
                    f"machine_id: this machine's host {host.id} has been revoked; it cannot "
                    "register again"
                )
            created = host is None
            if host is None:
                if token.max_uses and token.uses >= token.max_uses:
                    raise PermissionDenied(NO_USES_LEFT)
                host = new_host(
                    repo,
                    host_id=new_id("host"),
                    provider_tenant_id=token.provider_tenant_id,
                    machine_id=request.machine_id,
                    now=now,
                )
                host.self_service = token.self_service
            host.hostname = request.hostname
            host.simulated = request.simulated
            host.location = request.location
            host.labels = dict(request.labels)
            host.price_per_gpu_hour = request.price_per_gpu_hour_micro_credits
            host.credential_hash = hash_secret(credential)
            host.daemon_version = request.daemon_version[:64]
            host.driver_version = request.driver_version[:64]
            host.cuda_driver_version = request.cuda_driver_version[:64]
            host.cpu_count = request.cpu_count
            host.memory_bytes = request.memory_bytes
            # Re-registration replaces the key: reports signed by the earlier one are refused.
            host.signing_public_key = request.signing_public_key or None
            host.last_heartbeat_at = now
            await repo.flush()
            gpus = await self._sync_gpus(repo, host, request, created)
            await _unverify_if_changed(repo, host, now)
            await repo.score([host], now)
            registration = HostRegistration(host, credential, gpus=gpus)
            await self._new_nats_user(repo, registration, now)
            # A use is counted last (atomically: a race for the last use fails here and rolls
            # back), so the token's row stays locked only until the commit: the hosts of a
            # fleet installed with one token do not queue on it for the whole registration.
            if created and not await repo.consume_token(token.id):
                raise PermissionDenied(NO_USES_LEFT)
        self._registered[host.id] = time.monotonic()
        return registration

    async def _new_nats_user(
        self, repo: RegistryRepository, registration: HostRegistration, now: datetime
    ) -> None:
        """A registered host's new NATS user (when NATS auth is on); the earlier one revoked."""
        if self.nats_auth is None:
            return
        host = registration.host
        user = self.nats_auth.host_user(host.id)
        if host.nats_user_key and host.nats_user_key != user.public_key:
            # Whoever holds the earlier host.json loses NATS as well as gRPC.
            await repo.revoke_nats_user(host.nats_user_key, host.id, now)
            registration.revoked_nats_user = True
        host.nats_user_key = user.public_key
        registration.nats_credentials = user.creds

    async def _sync_gpus(
        self,
        repo: RegistryRepository,
        host: Host,
        request: registry_pb2.RegisterHostRequest,
        created: bool,
    ) -> list[Gpu]:
        """Stores the GPUs the host reports; those it no longer reports are unhealthy. Returns
        its GPU rows by index. A host `created` now has no other row to read."""
        existing = {g.uuid: g for g in await repo.gpus_by_uuid([g.uuid for g in request.gpus])}
        added: list[Gpu] = []
        for gpu in request.gpus:
            row = existing.get(gpu.uuid)
            if row is not None and row.host_id != host.id:
                raise AlreadyExists(f"gpus: GPU {gpu.uuid} is registered to another host")
            if row is None:
                row = Gpu(uuid=gpu.uuid, host_id=host.id, healthy=True, unhealthy_reason="")
                repo.add(row)
                added.append(row)
            row.index = gpu.index
            row.name = gpu.name
            row.memory_total_bytes = gpu.memory_total_bytes
            row.compute_capability = gpu.compute_capability
            row.pci_bus_id = gpu.pci_bus_id
            row.mig_mode = gpu.mig_mode
            row.power_limit_milliwatts = gpu.power_limit_milliwatts
        if created:
            return sorted(added, key=lambda row: row.index)
        reported = {g.uuid for g in request.gpus}
        rows = list(await repo.gpus_of([host.id]))
        for row in rows:
            if row.uuid not in reported:
                if row.healthy:
                    host.gpu_faults += 1
                    note_outcome(host, False, utcnow())
                row.healthy = False
                row.unhealthy_reason = "GPU no longer reported by the host"
        return rows

    async def authenticate_host(self, secret: str) -> Principal | None:
        """The principal of a host credential, or None when it is not one."""
        if not secret.startswith(HOST_CREDENTIAL_PREFIX):
            return None
        async with self.db.read() as session:
            host = await RegistryRepository(session).host_by_credential(hash_secret(secret))
        if host is None:
            return None
        return Principal(tenant_id=host.provider_tenant_id, role=Role.HOST, principal_id=host.id)

    # Connect stream: heartbeats, telemetry ------------------------------------------------

    async def connect(
        self,
        host_id: str,
        running: Iterable[registry_pb2.RunningJob] = (),
        hello: registry_pb2.DaemonHello | None = None,
    ) -> Host:
        """A daemon's hello: records a heartbeat (a REGISTERED host goes online), starts
        keeping its telemetry."""
        async with self.connecting:
            host, gpus = await self._record_heartbeat(host_id, hello=True)
            self._registered.pop(host_id, None)
            running = list(running)
            self._running[host_id] = _keys(running)
            if self.verification is not None:
                await self.verification.hello(host_id, hello, known=host)
            if self.monitor is not None:
                await self.monitor.attach(host_id, gpus)
                self.monitor.running(host_id, running)
        if self.on_host_connected is not None:
            self.on_host_connected()
        return host

    async def disconnect(self, stream: HostStream) -> None:
        """A Connect stream ended: unless a newer one of its host is open here, the host's
        telemetry and commands are no longer this replica's."""
        if not self.streams.close(stream):
            return
        self._running.pop(stream.host_id, None)
        if self.monitor is not None:
            self.monitor.detach(stream.host_id)
        self.commands.closed(stream.host_id)

    async def heartbeat(
        self,
        host_id: str,
        running: Iterable[registry_pb2.RunningJob] = (),
        sent: datetime | None = None,
    ) -> None:
        """Records a heartbeat (written at the next flush); a lost host that reports again is
        back at once. `sent`: the daemon's timestamp, for the processing-lag metric."""
        if sent is not None and self.on_heartbeat_lag is not None:
            self.on_heartbeat_lag(max(0.0, (utcnow() - sent).total_seconds()))
        running = list(running)
        if self.streams.connected(host_id):
            self._running[host_id] = _keys(running)
        if self.monitor is not None:
            self.monitor.running(host_id, running)
        await self._heard_from(host_id)

    def running_lists(self) -> dict[str, frozenset[tuple[str, int]]]:
        """(job id, attempt) of what each daemon connected here said it runs, last time."""
        return {h: keys for h, keys in self._running.items() if self.streams.connected(h)}

    async def receive_telemetry(self, host_id: str, batch: registry_pb2.TelemetryBatch) -> None:
        """One telemetry batch; it is a sign of life too."""
        if self.monitor is not None:
            await self.monitor.record_batch(host_id, batch)
        await self._heard_from(host_id)

    def telemetry_of(self, host_id: str) -> dict[str, GpuSeries]:
        """The GPUs' telemetry kept here, by uuid (empty when the host is not connected here)."""
        if self.monitor is None:
            return {}
        host = self.monitor.buffer.hosts.get(host_id)
        return host.gpus if host is not None else {}

    # Hosts ---------------------------------------------------------------------------------

    async def get_host(self, caller: Principal, host_id: str) -> tuple[Host, Sequence[Gpu]]:
        async with self.db.read() as session:
            repo = RegistryRepository(session)
            host = await repo.get_readable_host(caller, host_id)
            if host is None:
                raise NotFound(f"host_id: no host {host_id!r}")
            await repo.score([host], utcnow())
            return host, await repo.gpus_of([host.id])

    async def list_hosts(
        self,
        caller: Principal,
        states: Sequence[str],
        provider: str,
        page: PageRequest,
        id_prefix: str = "",
    ) -> tuple[Page[Host], dict[str, list[Gpu]]]:
        """One page of the hosts `caller` may see (with ids starting with `id_prefix`, when
        given), with their GPUs by host id."""
        owner = None if caller.is_admin and not provider else caller.require_tenant(provider)
        if id_prefix:
            validate_id_prefix("id_prefix", id_prefix)
        async with self.db.read() as session:
            repo = RegistryRepository(session)
            hosts = await repo.list_hosts(caller, states, owner, page, id_prefix)
            await repo.score(hosts.items, utcnow())
            gpus: dict[str, list[Gpu]] = {}
            for gpu in await repo.gpus_of([h.id for h in hosts.items]):
                gpus.setdefault(gpu.host_id, []).append(gpu)
            return hosts, gpus

    async def set_draining(
        self, caller: Principal, host_id: str, draining: bool, reason: str
    ) -> Host:
        """DrainHost / UndrainHost. A lost host keeps the request and drains when it returns;
        a draining host with no live attempt is drained at once."""
        if len(reason) > 500:
            raise InvalidArgument("reason", "at most 500 characters")
        now = utcnow()
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            host = await repo.get_readable_host(caller, host_id, lock=True)
            if host is None:
                raise NotFound(f"host_id: no host {host_id!r}")
            state = HostState(host.state)
            if draining:
                host.drain_reason = reason or host.drain_reason or DEFAULT_DRAIN_REASON
                if state == HostState.ONLINE:
                    set_host_state(repo, host, HostState.DRAINING, "DrainHost", now)
                if host.state == HostState.DRAINING.value and not await repo.has_live_attempts(
                    host.id
                ):
                    set_host_state(repo, host, HostState.DRAINED, "no job left", now)
            else:
                host.drain_reason = ""
                if state in (HostState.DRAINING, HostState.DRAINED):
                    set_host_state(repo, host, HostState.ONLINE, "UndrainHost", now)
            await repo.score([host], now)
            message = registry_pb2.ControlMessage(
                drain=registry_pb2.DrainCommand(draining=draining, reason=host.drain_reason)
            )
            # Stored with the change: whichever replica holds the host's stream delivers it.
            await CommandRepository(session).issue(host.id, message, now)
        self.streams.wake(host.id)
        return host

    async def update_host(
        self,
        caller: Principal,
        host_id: str,
        *,
        price: int | None = None,
        location: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Host:
        """UpdateHost: the host's price, location and labels (None keeps one). Placements copy
        the price into the attempt, so running attempts keep theirs; the market view holds are
        priced on is reread at once."""
        validate_offer(price, location, labels, self.max_price)
        async with self.db.transaction() as session:
            repo = RegistryRepository(session)
            host = await repo.get_readable_host(caller, host_id, lock=True)
            if host is None:
                raise NotFound(f"host_id: no host {host_id!r}")
            if host.revoked_at is not None:
                raise FailedPrecondition(f"host_id: host {host_id} has been revoked")
            if price is not None:
                host.price_per_gpu_hour = price
            if location is not None:
                host.location = location
            if labels is not None:
                host.labels = dict(labels)
            await repo.score([host], utcnow())
        if self.on_host_connected is not None:
            self.on_host_connected()
        return host

    async def maintain(self) -> None:
        """Periodic: idle draining hosts become drained; GPU health recovers (monitor)."""
        async with self.db.read() as session:
            idle = await RegistryRepository(session).idle_draining_hosts(lock=False)
        if idle:  # checked first without the writer lock: it is rarely needed
            async with self.db.transaction() as session:
                repo = RegistryRepository(session)
                for host in await repo.idle_draining_hosts():
                    set_host_state(repo, host, HostState.DRAINED, "no live attempt left", utcnow())
        if self.monitor is not None:
            await self.monitor.maintain()
        if self.verification is not None:
            await self.verification.sweep()

    async def probe_answer(self, host_id: str, answer: registry_pb2.ProbeAnswer) -> None:
        """A host's answer to a verification probe (verification.service)."""
        if self.verification is not None:
            await self.verification.answer(host_id, answer)

    # Offers --------------------------------------------------------------------------------

    async def list_offers(self, wanted: OfferFilter, page: PageRequest) -> Page[Offer]:
        """One page of the offers matching `wanted`, cheapest first."""
        offset = offset_of(page.token)
        wanted.validate()
        async with self.db.read() as session:
            hosts = await capacity_snapshot(session)
        return page_by_offset(build_offers(hosts, wanted), offset, page.limit)


def _keys(running: Iterable[registry_pb2.RunningJob]) -> frozenset[tuple[str, int]]:
    return frozenset((job.job_id, job.attempt) for job in running)
