"""Who this host is to the control plane: registration, and host.json (mode 0600) that keeps it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TypeVar

import grpc
from gpuplane.v1 import registry_pb2, registry_pb2_grpc

from daemon.connect import Backoff
from daemon.gpus import GpuInventory
from daemon.settings import DaemonSettings
from messaging.signing import SigningKey

log = logging.getLogger(__name__)
T = TypeVar("T")


class RegistrationError(Exception):
    """The daemon has no identity and cannot get one; the message says what to do."""


def daemon_version() -> str:
    try:
        return metadata.version("gpuplane")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


@dataclass
class HostIdentity:
    """What registration returned, as kept in data_dir/host.json."""

    host_id: str
    host_credential: str
    control_plane: str
    nats_servers: list[str] = field(default_factory=list)
    dispatch_subject: str = ""
    dispatch_stream: str = ""
    dispatch_durable: str = ""
    # .creds text (user JWT + nkey seed) scoped to this host; empty on open NATS servers.
    nats_credentials: str = ""
    nats_inbox_prefix: str = ""
    heartbeat_interval_ms: int = 0
    telemetry_interval_ms: int = 0

    @classmethod
    def from_response(
        cls, response: registry_pb2.RegisterHostResponse, control_plane: str
    ) -> HostIdentity:
        nats = response.nats
        return cls(
            host_id=response.host_id,
            host_credential=response.host_credential,
            control_plane=control_plane,
            nats_servers=list(nats.servers),
            dispatch_subject=nats.dispatch_subject,
            dispatch_stream=nats.stream,
            dispatch_durable=nats.durable,
            nats_credentials=nats.credentials,
            nats_inbox_prefix=nats.inbox_prefix,
            heartbeat_interval_ms=response.heartbeat_interval_ms,
            telemetry_interval_ms=response.telemetry_interval_ms,
        )

    def save(self, path: Path) -> None:
        """Writes atomically, readable by the daemon's user only (it holds a credential)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(asdict(self), indent=2).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> HostIdentity | None:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RegistrationError(
                f"{path} is unreadable ({exc}); remove it to re-register"
            ) from exc
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; setting mode 0600", path)
            path.chmod(0o600)
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as exc:
            raise RegistrationError(
                f"{path} is malformed ({exc}); remove it to re-register"
            ) from exc


def load_identity(settings: DaemonSettings) -> HostIdentity | None:
    """The identity in host.json, or None when the host must register. One registered by an
    earlier release has no signing key: it registers again (its reports would be refused),
    which needs a registration token."""
    identity = HostIdentity.load(settings.host_file)
    if identity is None or settings.signing_key_file.exists():
        return identity
    if settings.registration_token is None:
        raise RegistrationError(
            f"this host registered without a signing key ({settings.signing_key_file} "
            "does not exist) and its reports would be refused: pass --token (or "
            "GPUPLANE_DAEMON_REGISTRATION_TOKEN) to register it again"
        )
    return None


def register_request(
    settings: DaemonSettings, inventory: GpuInventory, token: str
) -> registry_pb2.RegisterHostRequest:
    """Registration with the host's public key (its key pair is created now, the first
    time, and kept in data_dir/host.key)."""
    key = SigningKey.load_or_create(settings.signing_key_file)
    return registry_pb2.RegisterHostRequest(
        signing_public_key=key.public_bytes,
        registration_token=token,
        machine_id=settings.machine_id,
        hostname=settings.hostname,
        gpus=inventory.gpus,
        simulated=inventory.simulated,
        price_per_gpu_hour_micro_credits=settings.price_per_gpu_hour_micro_credits,
        location=settings.location,
        labels=settings.labels,
        daemon_version=daemon_version(),
        driver_version=inventory.driver_version,
        cuda_driver_version=inventory.cuda_driver_version,
        cpu_count=os.cpu_count() or 0,
        memory_bytes=memory_bytes(),
    )


def required_token(settings: DaemonSettings) -> str:
    """The registration token of a host not registered yet; RegistrationError without one."""
    if settings.registration_token is None:
        raise RegistrationError(
            f"this host is not registered ({settings.host_file} does not exist) and no "
            "registration token was given: pass --token-file (or set "
            "GPUPLANE_DAEMON_REGISTRATION_TOKEN_FILE or GPUPLANE_DAEMON_REGISTRATION_TOKEN)"
        )
    return settings.registration_token.get_secret_value()


# Answers that say "not now" rather than "no": a control plane that is down or slow
# (UNAVAILABLE, DEADLINE_EXCEEDED), shedding load (RESOURCE_EXHAUSTED: gRPC core's pending-call
# limit, rate limits), or a call cut short (CANCELLED, ABORTED) while thousands of hosts
# (re)connect at once. Registration and the offer's update are retried on them.
RETRIED = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


async def register(
    settings: DaemonSettings, inventory: GpuInventory, channel: grpc.aio.Channel
) -> HostIdentity:
    """Exchanges the registration token for an identity and saves it to host.json."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    request = register_request(settings, inventory, required_token(settings))
    try:
        response = await stub.RegisterHost(request, timeout=30)
    except grpc.aio.AioRpcError as exc:
        if exc.code() in RETRIED:
            raise
        raise RegistrationError(
            f"the control plane at {settings.control_plane} refused to register this host: "
            f"{exc.code().name}: {exc.details()}"
        ) from exc
    identity = HostIdentity.from_response(response, settings.control_plane)
    identity.save(settings.host_file)
    log.info("registered as host %s with %d GPUs", identity.host_id, len(inventory.gpus))
    return identity


async def apply_offer(
    settings: DaemonSettings, identity: HostIdentity, channel: grpc.aio.Channel
) -> None:
    """A registered host's restart: its price, location and labels flags become the host's
    (UpdateHost with its own credential); jobs placed from now on use the new price. The
    answer names the NATS servers to use now: when they moved since registration, they
    replace the ones in host.json."""
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    request = registry_pb2.UpdateHostRequest(
        host_id=identity.host_id,
        price_per_gpu_hour_micro_credits=settings.price_per_gpu_hour_micro_credits,
        location=settings.location,
        replace_labels=True,
        labels=settings.labels,
    )
    metadata = (("authorization", f"Bearer {identity.host_credential}"),)
    try:
        response = await stub.UpdateHost(request, timeout=30, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code in RETRIED:
            raise
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED):
            # A refused credential re-registers (with these flags) once connected; an older
            # control plane cannot update a host.
            log.warning("could not apply this host's flags: %s: %s", code.name, exc.details())
            return
        raise RegistrationError(
            f"the control plane at {settings.control_plane} refused this host's price, "
            f"location or labels: {code.name}: {exc.details()}"
        ) from exc
    take_nats_servers(identity, list(response.nats_servers), settings.host_file)


def take_nats_servers(identity: HostIdentity, servers: list[str], host_file: Path) -> None:
    """The control plane's NATS servers of now replace those kept since registration
    (an older control plane sends none: the kept ones stay)."""
    if not servers or servers == identity.nats_servers:
        return
    log.info("NATS servers moved: %s (was %s)", ",".join(servers), ",".join(identity.nats_servers))
    identity.nats_servers = servers
    identity.save(host_file)


async def until_answered(settings: DaemonSettings, call: Callable[[], Awaitable[T]]) -> T:
    """`call` until the control plane answers: an RPC error of RETRIED (the others raise
    RegistrationError) is retried with jittered backoff."""
    backoff = Backoff(settings.reconnect_base_seconds, settings.reconnect_max_seconds)
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            delay = backoff.next_delay()
            log.warning(
                "control plane %s unreachable (%s); retrying in %.1fs",
                settings.control_plane,
                exc.code().name,
                delay,
            )
        await asyncio.sleep(delay)
