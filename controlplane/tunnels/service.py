"""Opens tunnels: checks the caller may reach the job, stores the host's TunnelCommand, waits."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from gpuplane.v1 import registry_pb2, tunnels_pb2
from sqlalchemy.ext.asyncio import AsyncSession

from controlplane.auth.principal import Principal
from controlplane.commands.repository import CommandRepository
from controlplane.db.base import utcnow
from controlplane.db.engine import Database
from controlplane.errors import FailedPrecondition, NotFound
from controlplane.jobs.repository import JobRepository
from controlplane.jobs.states import JobState
from controlplane.registry.streams import HostStreams
from controlplane.settings_groups import ServingSettings
from controlplane.tunnels.broker import Pipe, TunnelBroker, wait_arrival
from controlplane.tunnels.data import DataPort
from controlplane.tunnels.standing import StandingStreams, Streams

# What a tunnel opens: a command to exec, or a port to forward to.
Target = tunnels_pb2.ExecStart | int


class TunnelService:
    """Exec and port-forward into a RUNNING job's container, through the host's daemon: the
    replica taking the client's call stores a TunnelCommand for the host (delivered, like any
    command, by whichever replica holds its Connect stream) naming `address`, and waits for
    the daemon to call back there (TunnelRelayService.Tunnel) for `open_timeout` seconds."""

    def __init__(
        self,
        db: Database,
        streams: HostStreams,
        broker: TunnelBroker,
        *,
        open_timeout: float = 5.0,
        data: DataPort | None = None,
    ) -> None:
        self.db = db
        self.streams = streams
        self.broker = broker
        self.open_timeout = open_timeout
        # host:port daemons reach this replica at (set once the server listens).
        self.address = ""
        # The raw data port (controlplane/tunnels/data.py) and the host:port it is reached at.
        self.data = data
        self.data_address = ""
        self.standing = StandingStreams(self)

    def open_stream(self, job_id: str, port: int) -> AbstractAsyncContextManager[Streams]:
        """`async with tunnels.open_stream(job_id, port) as (reader, writer)`: a raw byte
        stream to 127.0.0.1:port in a running job's container, over a connection its daemon
        keeps standing at this replica's data port (controlplane/tunnels/standing.py). For
        the control plane's own use (the services gateway): the caller authorised it."""
        return self.standing.open_stream(job_id, port)

    async def listen(self, serving: ServingSettings, grpc_port: int) -> None:
        """The gRPC API listens on `grpc_port`: daemons call back there; the data port starts."""
        self.address = advertised(serving, grpc_port)
        if self.data is not None:
            port = await self.data.start(serving.tunnel_data_address)
            self.data_address = advertised_data(serving, port)

    async def close(self) -> None:
        """This replica is stopping: tunnels end (their clients get UNAVAILABLE)."""
        self.broker.close()
        self.standing.close()
        if self.data is not None:
            await self.data.stop()

    @asynccontextmanager
    async def open(
        self, caller: Principal, job_id: str, target: Target, *, raw: bool = False
    ) -> AsyncIterator[Pipe]:
        """A tunnel into the job's container, paired with its daemon's call; forgotten (and
        the daemon's call ended) on the way out. `raw` (a port only): the daemon also opens
        a raw connection to the data port (controlplane/tunnels/raw.py carries the bytes)."""
        # Waiting before the command exists: the daemon may call back before the commit returns.
        pipe = self.broker.expect()
        if raw:
            if self.data is None:
                raise FailedPrecondition("raw: this control plane has no tunnel data port")
            pipe.daemon_link = self.data.expect(pipe.tunnel_id)

        async def work(session: AsyncSession) -> str:
            job = await JobRepository(session).get_readable(caller, job_id)
            if job is None:
                raise NotFound(f"job_id: no job {job_id!r}")
            if job.state != JobState.RUNNING.value or not job.host_id:
                raise FailedPrecondition(
                    f"job_id: job {job_id} is {job.state}; exec and port-forward need a "
                    "running workload"
                )
            pipe.host_id = job.host_id  # the only host whose call back it pairs with
            command = tunnels_pb2.TunnelCommand(
                tunnel_id=pipe.tunnel_id,
                job_id=job.id,
                attempt=job.attempt,
                address=self.address,
            )
            if isinstance(target, int):
                command.port = target
                if raw and self.data is not None:
                    command.data_address, command.data_tls = self.data_address, self.data.tls
            else:
                command.exec.CopyFrom(target)
            # No job_id on the row: several tunnels into one attempt are all stored.
            message = registry_pb2.ControlMessage(tunnel=command)
            await CommandRepository(session).issue(job.host_id, message, utcnow())
            return job.host_id

        try:
            self.streams.wake(await self.db.run(work))
            await wait_arrival(pipe, self.open_timeout)
            yield pipe
        finally:
            self.broker.forget(pipe)
            if self.data is not None:
                self.data.forget(pipe.tunnel_id)
                if pipe.client_token:
                    self.data.forget(pipe.client_token)


def advertised(serving: ServingSettings, port: int) -> str:
    """The address daemons call this replica back at: the setting, else the listen address
    with the port it got (a wildcard host becomes this machine's name)."""
    if serving.advertise_address:
        return serving.advertise_address
    return f"{_named(serving.listen_addr.rpartition(':')[0])}:{port}"


def advertised_data(serving: ServingSettings, port: int) -> str:
    """The address clients and daemons reach the tunnel data port at: its listen address
    with the port it got; a wildcard host becomes the advertised gRPC address's host (else
    this machine's name)."""
    host = serving.tunnel_data_address.rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]", "::") and serving.advertise_address:
        host = serving.advertise_address.rpartition(":")[0]
    return f"{_named(host)}:{port}"


def _named(host: str) -> str:
    return socket.getfqdn() if host in ("", "0.0.0.0", "[::]", "::") else host
